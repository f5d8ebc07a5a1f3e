"""Several samples of one prompt: ``n`` and ``best_of``, seeded, sharing the prompt's KV blocks."""

from __future__ import annotations

import asyncio

import pytest
from conftest import random_prompts

from acb import Engine, EngineConfig, SamplingParams
from acb.errors import InvalidSamplingParamsError

pytestmark = pytest.mark.loops("asyncio")


async def test_seeded_samples_are_reproducible_distinct_and_independent_of_other_traffic(make_model, tokenizer):
    model, _ = make_model("llama", seed=21)
    prompt = random_prompts(1, [20], len(tokenizer), seed=21)[0]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, n=4, ignore_eos=True)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        alone = await engine.generate_choices(prompt, params)
        noise = [engine.generate(p, SamplingParams(max_new_tokens=30, temperature=0.9, ignore_eos=True))
                 for p in random_prompts(6, [5, 33], len(tokenizer), seed=3)]  # fmt: skip
        busy, *_ = await asyncio.gather(engine.generate_choices(prompt, params), *noise)
        single = await engine.generate(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=9,
                                                              ignore_eos=True))  # fmt: skip
    assert [c.token_ids for c in alone] == [c.token_ids for c in busy]
    assert len({tuple(c.token_ids) for c in alone}) == 4  # each sample its own seed
    assert alone[2].token_ids == single.token_ids  # sample i is seeded with seed + i
    assert [c.request_id for c in alone][:2] != [c.request_id for c in busy][:2]


async def test_samples_share_the_prompts_kv_blocks(make_model, tokenizer):
    model, _ = make_model("llama", seed=22)
    prompt = random_prompts(1, [41], len(tokenizer), seed=22)[0]
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        outs = await engine.generate_choices(prompt, SamplingParams(max_new_tokens=6, temperature=0.7, n=5))
        stats = engine.stats()
    assert len(outs) == 5 and all(len(c.token_ids) >= 1 for c in outs)
    assert stats.prefix_cached_tokens >= 4 * 40  # every later sample found the prompt's five full blocks cached
    assert stats.kv_blocks_free == stats.kv_blocks_total


async def test_best_of_keeps_the_n_most_likely_samples(make_model, tokenizer):
    model, _ = make_model("llama", seed=23)
    prompt = random_prompts(1, [9], len(tokenizer), seed=23)[0]
    base = dict(max_new_tokens=8, temperature=1.2, seed=100, ignore_eos=True)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        every = await engine.generate_choices(prompt, SamplingParams(n=5, logprobs=True, **base))
        best = await engine.generate_choices(prompt, SamplingParams(n=2, best_of=5, **base))
    ranked = sorted(every, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert all(c.logprobs is None for c in best)  # not asked for: used for ranking only


async def test_streamed_samples_and_their_limits(make_model, tokenizer):
    model, _ = make_model("llama", seed=24)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        streams = await engine.submit_choices("hi", SamplingParams(max_new_tokens=5, n=3, temperature=1.0, seed=1),
                                              request_id="r")  # fmt: skip
        assert [s.request_id for s in streams] == ["r-0", "r-1", "r-2"]
        texts = await asyncio.gather(*(s.collect() for s in streams))
        assert all(len(t.token_ids) >= 1 for t in texts)
        with pytest.raises(InvalidSamplingParamsError, match="cannot stream"):
            await engine.submit_choices("hi", SamplingParams(n=1, best_of=3))
        with pytest.raises(InvalidSamplingParamsError, match="generate_choices"):
            async for _ in engine.stream("hi", SamplingParams(n=2)):
                pass
        # abandoning every sample frees everything
        streams = await engine.submit_choices("hi there", SamplingParams(max_new_tokens=300, n=4, ignore_eos=True))
        async for _ in streams[0]:
            break
        for s in streams:
            await s.aclose()
        for _ in range(100):
            stats = engine.stats()
            if stats.num_running == stats.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0


async def test_a_cancelled_generate_choices_ends_every_sample(make_model, tokenizer):
    model, _ = make_model("llama", seed=25)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        task = asyncio.ensure_future(
            engine.generate_choices("x", SamplingParams(max_new_tokens=5000, n=3, ignore_eos=True))
        )
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            stats = engine.stats()
            if stats.num_running == stats.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
    assert stats.kv_blocks_free == stats.kv_blocks_total
