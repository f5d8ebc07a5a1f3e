"""Cancellation: break, task cancel and abort() end requests promptly and free their KV blocks."""

from __future__ import annotations

import asyncio

from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams

PARAMS = SamplingParams(max_new_tokens=40, ignore_eos=True)


async def test_cancelling_half_of_32_streams(make_model, tokenizer):
    model, ref = make_model("llama", seed=41)
    prompts = random_prompts(32, [4, 12, 25, 40], len(tokenizer), seed=41)
    keep = range(1, 32, 2)
    expected = {i: reference_greedy(ref, prompts[i], 40) for i in keep}
    config = EngineConfig(block_size=8, max_num_batched_tokens=128)
    async with Engine(model, tokenizer, config) as engine:
        got: dict[int, list[int]] = {}

        async def consume(i: int, stop_after: int | None):
            ids = []
            async for tok in engine.stream(prompts[i], PARAMS, request_id=f"r{i}"):
                if tok.id is not None:
                    ids.append(tok.id)
                if stop_after is not None and len(ids) == stop_after:
                    if i % 4 == 0:
                        break  # leave the loop early
                    engine.abort(f"r{i}")  # abort by id: the stream then ends with an "abort" marker
            got[i] = ids
            return tok

        tasks = {}
        for i in range(32):
            stop_after = None if i in keep else 3 + i % 7
            if i % 8 == 2:
                stop_after = None  # these get cancelled as tasks instead
            tasks[i] = asyncio.create_task(consume(i, stop_after))
        await asyncio.sleep(0.05)
        for i in range(2, 32, 8):
            tasks[i].cancel()
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        for i, r in zip(tasks, results):
            if i % 8 == 2:
                assert isinstance(r, asyncio.CancelledError) or r.finish_reason == "length"
            elif i % 4 == 2 and i not in keep:
                assert r.finish_reason == "abort" and r.id is None
        await asyncio.sleep(0)
        stats = engine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert not engine._live
    for i in keep:
        assert got[i] == expected[i]


async def test_break_frees_blocks_immediately(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=4)) as engine:
        async for tok in engine.stream("a fairly long prompt to hold several blocks", PARAMS):
            assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total
            break
        # no GC pass and no await needed: the stream's finalizer aborted the request when the loop let go of it
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        assert engine.stats().num_running == 0


async def test_aclose_and_timeout_abort(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer) as engine:
        stream = engine.stream("hello", SamplingParams(max_new_tokens=500, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total

        async def slow_consumer():
            async for _ in engine.stream("hello", SamplingParams(max_new_tokens=1000, ignore_eos=True)):
                await asyncio.sleep(0.01)

        try:
            async with asyncio.timeout(0.1):
                await slow_consumer()
        except TimeoutError:
            pass
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        assert not engine._live


async def test_abort_unknown_id_returns_false(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer) as engine:
        assert engine.abort("nope") is False
