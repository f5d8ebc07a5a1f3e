"""Prefix caching: requests that share a prompt prefix share its KV blocks, and get exactly the tokens they would
get without the cache."""

from __future__ import annotations

import asyncio
import random

import pytest
from conftest import reference_greedy

from acb import Engine, EngineConfig, SamplingParams


def _workload(vocab: int, seed: int) -> list[list[int]]:
    """Shared system prompts with different suffixes, multi-turn histories that resend earlier turns, and exact
    repeats (whole prompts cached: the last token is computed again)."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, vocab) for _ in range(n)] for n in (40, 33, 16)]
    prompts = []
    for i in range(9):
        prompts.append(systems[i % 3] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))])
    turn = systems[0] + [5, 6, 7]
    for _ in range(3):  # multi-turn: each turn extends the last
        turn = turn + [rng.randrange(3, vocab) for _ in range(rng.randint(5, 19))]
        prompts.append(list(turn))
    prompts += [list(prompts[0]), list(prompts[4]), systems[2][:16], systems[2][:16]]  # repeats, block-aligned too
    return prompts


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_greedy_outputs_are_identical_with_the_cache_on_and_off(arch, overlap, make_model, tokenizer):
    model, ref = make_model(arch, seed=51)
    prompts = _workload(len(tokenizer), seed=51)
    expected = [reference_greedy(ref, p, 12) for p in prompts]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    async def run(prefix_caching: bool, m):
        # a pool of 30 blocks of 8 forces preemption; arrivals in waves let later requests find earlier prefixes
        config = EngineConfig(
            block_size=8, num_kv_blocks=30, max_num_batched_tokens=48, overlap=overlap, prefix_caching=prefix_caching
        )
        async with Engine(m, tokenizer, config) as engine:

            async def one(i, p):
                await asyncio.sleep(0.01 * (i // 4))
                return await engine.generate(p, params)

            outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            stats = engine.stats()
            assert stats.kv_blocks_free == stats.kv_blocks_total  # cached blocks are free blocks
        return [o.token_ids for o in outs], stats

    import copy

    off, off_stats = await run(False, copy.deepcopy(model))
    on, on_stats = await run(True, model)
    assert on == off == expected
    assert off_stats.prefix_hits == 0 and off_stats.prefix_cached_tokens == 0
    assert on_stats.prefix_hits >= 6 and on_stats.prefix_cached_tokens >= 200
    assert on_stats.prefix_queries >= len(prompts)
    assert on_stats.num_preemptions > 0


async def test_cancellations_mid_prefill_and_faults_leave_the_cache_consistent(make_model, tokenizer, caplog):
    """Requests cancelled while their prompt is being computed, and a step that fails, never leave a cached block
    that later requests read wrong."""
    import logging

    caplog.set_level(logging.CRITICAL, logger="acb")
    model, ref = make_model("llama", seed=53)
    forward = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected")
        return forward(*args, **kwargs)

    model.forward = flaky
    rng = random.Random(53)
    system = [rng.randrange(3, len(tokenizer)) for _ in range(90)]
    prompts = [system + [rng.randrange(3, len(tokenizer)) for _ in range(5)] for _ in range(8)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    config = EngineConfig(block_size=8, max_num_batched_tokens=32)  # a 95-token prompt takes three steps
    async with Engine(model, tokenizer, config) as engine:
        first = [asyncio.create_task(engine.generate(p, params)) for p in prompts[:4]]
        await asyncio.sleep(0.02)
        for t in first[:2]:
            t.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        later = await asyncio.gather(*(engine.generate(p, params) for p in prompts[4:]))
        stats = engine.stats()
    assert [o.token_ids for o in later] == [reference_greedy(ref, p, 8) for p in prompts[4:]]
    assert stats.prefix_hits > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


async def test_stats_and_clearing_the_cache(make_model, tokenizer):
    model, ref = make_model("llama", seed=55)
    prompt = list(range(10, 10 + 45))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        a = await engine.generate(prompt, params)
        s1 = engine.stats()
        b = await engine.generate(prompt, params)
        s2 = engine.stats()
        assert a.token_ids == b.token_ids == reference_greedy(ref, prompt, 4)
        assert (s1.prefix_queries, s1.prefix_hits, s1.prefix_cached_tokens) == (1, 0, 0)
        # the second run finds the 5 full blocks of the prompt (40 of its 45 tokens)
        assert (s2.prefix_queries, s2.prefix_hits, s2.prefix_cached_tokens) == (2, 1, 40)
        assert s2.prefix_queried_tokens == 90 and s2.prefix_cached_blocks >= 5
        assert engine.clear_prefix_cache() >= 5
        assert engine.stats().prefix_cached_blocks == 0
        c = await engine.generate(prompt, params)
        assert c.token_ids == a.token_ids and engine.stats().prefix_cached_tokens == 40  # nothing more was cached


async def test_eviction_reuses_cached_blocks_least_recently_freed_first(make_model, tokenizer):
    model, ref = make_model("llama", seed=57)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    prompts = [[7 + i] * 30 for i in range(6)]  # distinct content: each fills 4 blocks of 8
    async with Engine(model, tokenizer, EngineConfig(block_size=8, num_kv_blocks=12)) as engine:
        for p in prompts:
            await engine.generate(p, params)
        stats = engine.stats()
        assert stats.prefix_evictions > 0 and stats.prefix_cached_blocks <= 12
        out = await engine.generate(prompts[-1], params)  # the newest is still cached
        assert engine.stats().prefix_cached_tokens - stats.prefix_cached_tokens == 24
        assert out.token_ids == reference_greedy(ref, prompts[-1], 2)
        out = await engine.generate(prompts[0], params)  # the oldest was evicted
        assert engine.stats().prefix_cached_tokens - stats.prefix_cached_tokens == 24
        assert out.token_ids == reference_greedy(ref, prompts[0], 2)
