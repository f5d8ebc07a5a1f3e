"""End-to-end correctness: acb's greedy output equals transformers' ``model.generate`` token for token."""

from __future__ import annotations

import asyncio
import types

import pytest
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, InvalidConfigError, PromptTooLongError, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3"]
LENGTHS = [5, 17, 33, 64, 3, 100, 48, 9, 71, 1]


async def _staggered(engine: Engine, prompts: list[list[int]], max_new: list[int]):
    async def one(i: int, p: list[int]):
        await asyncio.sleep(0.005 * (i % 5))  # arrivals spread over the first steps
        return await engine.generate(p, SamplingParams(max_new_tokens=max_new[i], ignore_eos=True))

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


@pytest.mark.parametrize("path", ["generic", "lean"])
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", ARCHS)
async def test_greedy_matches_transformers_generate(arch, overlap, path, make_model, tokenizer):
    model, ref = make_model(arch)
    prompts = random_prompts(10, LENGTHS, len(tokenizer), seed=1)
    max_new = [20 + 3 * (i % 4) for i in range(len(prompts))]
    expected = [reference_greedy(ref, p, n) for p, n in zip(prompts, max_new)]
    config = EngineConfig(max_num_batched_tokens=64, block_size=8, overlap=overlap, fast_path=path == "lean")
    async with Engine(model, tokenizer, config) as engine:
        outs = await _staggered(engine, prompts, max_new)
        stats = engine.stats()
    for out, exp, p in zip(outs, expected, prompts):
        assert out.token_ids == exp, f"prompt of {len(p)} tokens diverged"
        assert out.finish_reason == "length"
        assert out.prompt_token_ids == p
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert stats.steps > len(prompts)  # chunked prefill and continuous batching actually happened


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_greedy_matches_under_preemption(arch, overlap, make_model, tokenizer):
    """A KV pool far smaller than the load: sequences are preempted and recomputed, outputs do not change."""
    model, ref = make_model(arch, seed=3)
    prompts = random_prompts(12, LENGTHS, len(tokenizer), seed=2)
    max_new = [24] * len(prompts)
    expected = [reference_greedy(ref, p, n) for p, n in zip(prompts, max_new)]
    # 22 blocks x 8 = 176 slots: the largest request (100 + 24) fits alone, the whole load (~740) never does.
    config = EngineConfig(max_num_batched_tokens=48, block_size=8, num_kv_blocks=22, overlap=overlap)
    async with Engine(model, tokenizer, config) as engine:
        outs = await _staggered(engine, prompts, max_new)
        stats = engine.stats()
    assert stats.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_a_prefill_cap_and_preemption_keep_generates_tokens(overlap, make_model, tokenizer):
    """prefill_chunk_tokens=5: while rows decode, prompts arrive five tokens a step (with preemption and staggered
    arrivals); the tokens do not change."""
    model, ref = make_model("llama", seed=4)
    prompts = random_prompts(10, LENGTHS, len(tokenizer), seed=4)
    max_new = [16] * len(prompts)
    expected = [reference_greedy(ref, p, n) for p, n in zip(prompts, max_new)]
    config = EngineConfig(max_num_batched_tokens=48, prefill_chunk_tokens=5, block_size=8, num_kv_blocks=22,
                          overlap=overlap)  # fmt: skip
    async with Engine(model, tokenizer, config) as engine:
        outs = await _staggered(engine, prompts, max_new)
        stats = engine.stats()
    assert [o.token_ids for o in outs] == expected
    assert stats.num_preemptions > 0 and stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("path", ["generic", "lean"])
async def test_a_deeper_pipeline_gives_the_same_tokens(path, make_model, tokenizer):
    """overlap_depth=3: two steps launched ahead; EOS endings compute two extra tokens, never emitted."""
    model, ref = make_model("llama", seed=9)
    prompts = random_prompts(8, LENGTHS, len(tokenizer), seed=9)
    eos = reference_greedy(ref, prompts[0], 30)[6]
    for m in (model, ref):
        m.generation_config.eos_token_id = eos
    expected = [reference_greedy(ref, p, 30, ignore_eos=False) for p in prompts]
    config = EngineConfig(block_size=8, max_num_batched_tokens=48, num_kv_blocks=30, overlap_depth=3,
                          fast_path=path == "lean")  # fmt: skip
    async with Engine(model, tokenizer, config) as engine:
        outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=30)) for p in prompts))
        stats = engine.stats()
    assert [o.token_ids for o in outs] == expected
    assert outs[0].finish_reason == "stop"
    assert stats.kv_blocks_free == stats.kv_blocks_total


async def test_eos_from_generation_config_stops_like_generate(make_model, tokenizer):
    model, ref = make_model("llama", seed=5)
    prompt = random_prompts(1, [12], len(tokenizer), seed=5)[0]
    free_run = reference_greedy(ref, prompt, 30)
    eos = free_run[7]  # make a token the model emits the EOS
    for m in (model, ref):
        m.generation_config.eos_token_id = eos
    expected = reference_greedy(ref, prompt, 30, ignore_eos=False)
    assert expected[-1] == eos and len(expected) < 30
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=30))
        ignored = await engine.generate(prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert out.token_ids == expected
    assert out.finish_reason == "stop"
    assert ignored.token_ids == free_run and ignored.finish_reason == "length"


async def test_stream_yields_one_token_per_step_with_text(make_model, tokenizer):
    model, ref = make_model("llama", seed=7)
    expected = reference_greedy(ref, tokenizer.encode("Hello world"), 16)
    async with Engine(model, tokenizer) as engine:
        toks = [t async for t in engine.stream("Hello world", SamplingParams(max_new_tokens=16, ignore_eos=True))]
    assert [t.id for t in toks] == expected
    assert all(t.finish_reason is None for t in toks[:-1]) and toks[-1].finish_reason == "length"
    assert "".join(t.text for t in toks) == tokenizer.decode(expected, skip_special_tokens=True)


async def test_max_model_len_ends_generation_with_length(make_model, tokenizer):
    model, ref = make_model("llama")
    prompt = random_prompts(1, [20], len(tokenizer))[0]
    async with Engine(model, tokenizer, EngineConfig(max_model_len=28, block_size=4)) as engine:
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True))
    assert out.finish_reason == "length"
    assert out.token_ids == reference_greedy(ref, prompt, 8)


async def test_a_model_with_learned_positions_runs_to_its_last_position_and_no_further(make_model, tokenizer):
    """GPT-2 has ``n_positions`` rows of position embeddings: max_model_len defaults to that many, a request runs up
    to the last one (``finish_reason="length"``, transformers' tokens) and a prompt that fills them all is refused
    at submit, never an IndexError mid-generation."""
    model, ref = make_model("gpt2", seed=6, max_position_embeddings=64)
    prompts = random_prompts(2, [60, 64], len(tokenizer), seed=6)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        assert engine.max_model_len == 64
        out = await engine.generate(prompts[0], SamplingParams(max_new_tokens=20, ignore_eos=True))
        assert (out.token_ids, out.finish_reason) == (reference_greedy(ref, prompts[0], 4), "length")
        with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
            await engine.generate(prompts[1], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("arch, words", [("gpt2", "learned table"), ("llama", "rotary")])
async def test_a_max_model_len_past_the_models_positions_is_refused(arch, words, make_model, tokenizer):
    """It used to be taken as given: GPT-2 failed every request that ran past ``n_positions`` with an IndexError in
    a step, a rotary model silently ran past the positions it was trained for."""
    model, ref = make_model(arch, seed=7, max_position_embeddings=64)
    with pytest.raises(InvalidConfigError, match=f"max_model_len=128 .* 64 positions.*{words}"):
        Engine(model, tokenizer, EngineConfig(max_model_len=128))
    prompt = random_prompts(1, [10], len(tokenizer), seed=7)[0]
    async with Engine(model, tokenizer, EngineConfig(max_model_len=64)) as engine:  # the model is as it was
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, prompt, 5)


def test_rotary_scaling_that_extends_the_context_raises_the_limit_as_vllm_derives_it():
    from acb.default_model import tiny_config
    from acb.model_setup import resolve_max_model_len

    yarn = tiny_config("qwen2", max_position_embeddings=64)
    yarn.rope_parameters = {**yarn.rope_parameters, "rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32}  # fmt: skip
    assert resolve_max_model_len(yarn, None) == 64  # unset: the model's own, not the scaled limit
    assert resolve_max_model_len(yarn, 128) == 128  # 32 x 4
    with pytest.raises(InvalidConfigError, match="129 is more than the 128 positions"):
        resolve_max_model_len(yarn, 129)
    plain = tiny_config("llama", max_position_embeddings=64)
    assert resolve_max_model_len(plain, 64) == 64 and resolve_max_model_len(plain, 8) == 8
    unknown = types.SimpleNamespace()  # a config that does not say
    assert resolve_max_model_len(unknown, None) == 4096 and resolve_max_model_len(unknown, 10**5) == 10**5


async def test_logprobs_match_model_distribution(make_model, tokenizer):
    import torch

    model, ref = make_model("llama", seed=11)
    prompt = random_prompts(1, [10], len(tokenizer), seed=11)[0]
    async with Engine(model, tokenizer) as engine:
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=True))
    ids = prompt + out.token_ids
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_the_cpu_path_imports_nothing_cuda_only():
    """The lean path on the CPU (and acb as a whole) must run where triton is not installed."""
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "sys.modules['triton'] = None  # as if not installed: any import of it raises\n"
        "from acb import Engine, EngineConfig, InvalidConfigError, PromptTooLongError, SamplingParams\n"
        "from acb.default_model import load_default\n"
        "async def main():\n"
        "    async with Engine(*load_default(), EngineConfig(fast_path=True)) as e:\n"
        "        await e.generate('hi', SamplingParams(max_new_tokens=3))\n"
        "asyncio.run(main())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("order", ["arrival", "longest_first"])
async def test_admission_order_picks_who_takes_a_free_slot(order, make_model, tokenizer):
    """One batch slot, held by a first request while five more queue (the longest of them cancelled while queued):
    when it leaves, ``arrival`` starts them in submission order, ``longest_first`` by their ``max_new_tokens``, most
    first; every request's tokens still equal ``generate``'s, and the cancelled one never runs. (The first request
    asks for far more tokens than it is let run, and leaves only once the queue is as the test wants it: a first
    request that finished on its own raced the queueing, and failed this test on a fast or a loaded machine.)"""
    model, ref = make_model("llama", seed=6)
    prompts = random_prompts(6, [7, 12, 5, 9, 20, 3], len(tokenizer), seed=6)
    max_new = [12, 3, 9, 5, 14, 7]  # request 0: the tokens read of it before it leaves
    expected = [reference_greedy(ref, p, n) for p, n in zip(prompts, max_new)]
    config = EngineConfig(max_num_seqs=1, admission_group=1, admission_order=order)
    finished = []

    async def until(predicate) -> None:
        for _ in range(1000):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the engine never got there")

    async with Engine(model, tokenizer, config) as engine:

        async def one(i: int):
            out = await engine.generate(prompts[i], SamplingParams(max_new_tokens=max_new[i], ignore_eos=True))
            finished.append(i)
            return out

        first = engine.stream(prompts[0], SamplingParams(max_new_tokens=1500, ignore_eos=True))
        got = [await anext(first)]  # request 0 holds the slot
        tasks = [asyncio.create_task(one(i)) for i in range(1, 6)]
        await until(lambda: engine.stats().num_waiting == 5)  # all five queued behind it
        tasks[3].cancel()  # request 4, the longest of them
        await asyncio.wait([tasks[3]])
        await until(lambda: engine.stats().num_waiting == 4)
        assert engine.stats().num_running == 1 and not finished
        got += [await anext(first) for _ in range(max_new[0] - 1)]
        await first.aclose()  # request 0 leaves: its slot goes to the queue, in the engine's order
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
    assert isinstance(outs[3], asyncio.CancelledError)
    assert finished == ([1, 2, 3, 5] if order == "arrival" else [2, 5, 3, 1])
    assert [o.token_ids for i, o in enumerate(outs) if i != 3] == [expected[i] for i in (1, 2, 3, 5)]
    assert [t.id for t in got] == expected[0]


def test_admission_order_is_checked():
    with pytest.raises(ValueError, match="admission_order"):
        EngineConfig(admission_order="shortest")
