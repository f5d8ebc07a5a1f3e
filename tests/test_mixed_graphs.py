"""The piecewise forward of the mixed-step graphs (acb/mixed_graphs.py), run eagerly on the CPU on the same padded
buckets the graphs capture on CUDA: the same logits as the plain lean forward, and ``model.generate``'s tokens
through the engine (preemption, staggered arrivals, both overlap modes)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams
from acb.mixed_graphs import mixed_buckets


def test_buckets_cover_every_step_size():
    assert mixed_buckets(8192) == [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert mixed_buckets(100) == [32, 64, 100] and mixed_buckets(32) == [32] and mixed_buckets(20) == [20]
    assert mixed_buckets(256, smallest=4, factor=4) == [4, 16, 64, 256]


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
async def test_piecewise_steps_give_generates_tokens(arch, overlap, make_model, tokenizer):
    model, ref = make_model(arch, seed=6)
    prompts = random_prompts(10, [5, 17, 33, 64, 3, 100, 48, 9, 71, 1], len(tokenizer), seed=6)
    expected = [reference_greedy(ref, p, 12) for p in prompts]
    # 48-token steps over buckets 32 and 48: most steps are padded; 22 blocks of 8 force preemption
    config = EngineConfig(fast_path=True, mixed_graphs=True, max_num_batched_tokens=48, block_size=8,
                          num_kv_blocks=22, overlap=overlap)  # fmt: skip

    async def one(i, p):
        await asyncio.sleep(0.005 * (i % 5))
        return await engine.generate(p, SamplingParams(max_new_tokens=12, ignore_eos=True))

    async with Engine(model, tokenizer, config) as engine:
        assert engine._runner.mixed is not None
        calls = _count_calls(engine._runner.mixed)
        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        stats = engine.stats()
    assert [o.token_ids for o in outs] == expected
    assert calls["n"] > 0 and stats.num_preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


def _count_calls(mixed) -> dict:
    calls = {"n": 0}
    forward = mixed.forward

    def counted(*args):
        calls["n"] += 1
        return forward(*args)

    mixed.forward = counted
    return calls


def test_padding_rows_never_reach_the_real_ones(make_model):
    """A bucket's rows past the step hold another step's leftovers: the logits of the real rows do not depend on
    them."""
    from acb.attention import AttentionMetadata
    from acb.families import lean_plan
    from acb.kv_cache import KVCache, ModelShape
    from acb.lean_model import LeanCausalLM, LeanInputs
    from acb.mixed_graphs import MixedGraphs

    model, _ = make_model("qwen3", seed=2)
    family, _ = lean_plan(model)
    lean = LeanCausalLM(model, family, 64, 4)
    shape = ModelShape.from_config(model.config)
    lean.kv_cache = KVCache(shape, 9, 8, torch.float32, torch.device("cpu"))
    mixed = MixedGraphs(lean, 48, 4, torch.device("cpu"))
    t = 20
    ids = torch.randint(0, shape.vocab_size, (t,))
    tables = torch.arange(3, dtype=torch.int64)[None]
    meta = AttentionMetadata(kv_cache=lean.kv_cache, slot_mapping=torch.arange(t), query_start_loc=[0, t],
                             seq_lens=[t], block_tables=tables, decode_only=False)  # fmt: skip
    x = LeanInputs(input_ids=ids, positions=torch.arange(t), slot_mapping=torch.arange(t),
                   seq_lens=torch.tensor([t]), block_tables=tables, query_start_loc=torch.tensor([0, t]),
                   max_query_len=t, logits_idx=torch.tensor([t - 1, 3]), meta=meta)  # fmt: skip
    want = lean.forward(x)
    bucket = mixed.buckets[0]
    assert bucket.tokens == 32
    for fill in (0, 7):
        bucket.ids.fill_(fill)  # what earlier steps left in the padding rows
        bucket.rows.fill_(fill)
        got = mixed.forward(x, t, 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
