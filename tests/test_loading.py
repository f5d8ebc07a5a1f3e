"""Engine.from_pretrained on a local directory written by save_pretrained."""

from __future__ import annotations

from conftest import reference_greedy

from acb import Engine, SamplingParams


async def test_from_pretrained_local_directory(tmp_path, make_model, tokenizer):
    model, ref = make_model("qwen2", seed=61)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(str(tmp_path), dtype="float32", device="cpu", block_size=8)
    prompt = tokenizer.encode("hello there")
    async with engine:
        out = await engine.generate("hello there", SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, prompt, 10)
    assert engine.config.block_size == 8
