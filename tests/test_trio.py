"""The engine on trio: the same behaviour as on asyncio, driven by ``trio.run`` (the engine's own tasks become trio
system tasks, GPU completions and worker threads wake the trio loop).

Each test is a plain function that runs its body with ``trio.run``; the rest of the suite covers asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
from conftest import encode_spy, random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams
from acb.errors import InvalidRequestError, WrongEventLoopError

trio = pytest.importorskip("trio")

LENGTHS = [5, 17, 33, 3, 64, 9]


def on_trio(fn):
    """Run the decorated coroutine function with ``trio.run`` (a sync test for pytest)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))

    return run


async def _generate_all(engine: Engine, prompts, max_new: int):
    outs = [None] * len(prompts)

    async def one(i: int):
        await trio.sleep(0.003 * (i % 4))  # arrivals spread over the first steps
        outs[i] = await engine.generate(prompts[i], SamplingParams(max_new_tokens=max_new, ignore_eos=True))

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    return outs


@pytest.mark.parametrize(
    "options",
    [
        {"fast_path": True, "overlap": True},
        {"fast_path": True, "overlap": False},
        {"fast_path": False, "overlap": True},
        {"fast_path": True, "overlap": True, "decode_steps": 4},
    ],
    ids=["lean-async", "lean-sync", "generic-async", "multi-step"],
)
@on_trio
async def test_greedy_matches_transformers_generate_on_trio(options, make_model, tokenizer):
    model, ref = make_model("llama", seed=5)
    prompts = random_prompts(6, LENGTHS, len(tokenizer), seed=5)
    expected = [reference_greedy(ref, p, 16) for p in prompts]
    config = EngineConfig(max_num_batched_tokens=48, block_size=8, **options)
    async with Engine(model, tokenizer, config) as engine:
        outs = await _generate_all(engine, prompts, 16)
        stats = engine.stats()
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    assert stats.kv_blocks_free == stats.kv_blocks_total


@on_trio
async def test_prefix_cache_hits_on_trio(make_model, tokenizer):
    model, ref = make_model("llama", seed=6)
    shared = random_prompts(1, [40], len(tokenizer), seed=6)[0]
    prompts = [shared + [7 + i] for i in range(4)]
    expected = [reference_greedy(ref, p, 8) for p in prompts]
    async with Engine(model, tokenizer, EngineConfig(block_size=8, max_num_batched_tokens=64)) as engine:
        first = await engine.generate(prompts[0], SamplingParams(max_new_tokens=8, ignore_eos=True))
        rest = await _generate_all(engine, prompts[1:], 8)
        stats = engine.stats()
    assert [first.token_ids] + [o.token_ids for o in rest] == expected
    assert stats.prefix_cached_tokens >= 3 * 40 // 8 * 8  # every later request reused the shared full blocks


@on_trio
async def test_streams_break_and_cancel_free_their_blocks_on_trio(make_model, tokenizer):
    model, ref = make_model("llama", seed=7)
    prompts = random_prompts(8, LENGTHS, len(tokenizer), seed=7)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    kept = {i: reference_greedy(ref, prompts[i], 30) for i in range(0, 8, 2)}
    got: dict[int, list[int]] = {}
    cancelled = []
    async with Engine(model, tokenizer, EngineConfig(block_size=8, max_num_batched_tokens=64)) as engine:

        async def consume(i: int):
            ids = []
            async for tok in engine.stream(prompts[i], params, request_id=f"r{i}"):
                ids.append(tok.id)
                if i % 4 == 1 and len(ids) == 3:
                    break  # leave the loop early: the request ends, its blocks come back
            got[i] = ids

        async def cancelled_consumer(i: int):
            with trio.move_on_after(0.05) as scope:  # trio's cancellation reaches the stream mid-read
                await consume(i)
            if scope.cancelled_caught:
                cancelled.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(cancelled_consumer if i % 4 == 3 else consume, i)
        await trio.sleep(0)
        stats = engine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
        assert stats.num_running == 0 and stats.num_waiting == 0
        # the engine serves on after all that
        again = await engine.generate(prompts[0], params)
    for i, exp in kept.items():
        assert got[i] == exp
    assert all(len(got[i]) == 3 for i in range(1, 8, 4))
    assert again.token_ids == kept[0]
    assert cancelled, "the 50 ms deadline should cut at least one 30-token stream short"


@on_trio
async def test_bad_requests_are_refused_with_typed_errors_on_trio(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=8, max_model_len=64)) as engine:
        with pytest.raises(InvalidRequestError):
            await engine.generate([], SamplingParams(max_new_tokens=2))
        with pytest.raises(InvalidRequestError):
            await engine.submit(list(range(3, 100)), SamplingParams(max_new_tokens=2))  # longer than max_model_len
        out = await engine.generate([5, 6, 7], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert len(out.token_ids) == 2


@on_trio
async def test_long_prompts_are_tokenized_off_the_trio_loop(make_model, tokenizer):
    model, _ = make_model("llama")
    seen, spy = encode_spy(tokenizer)

    async with Engine(model, tokenizer, EngineConfig(long_prompt_chars=100, max_model_len=2048)) as engine:
        engine._admission.tokenizer.encode = spy
        await engine.generate("short", SamplingParams(max_new_tokens=1))
        await engine.generate("long " * 60, SamplingParams(max_new_tokens=1))
    assert seen == [True, False]


@on_trio
async def test_a_slow_forward_never_blocks_the_trio_loop(make_model, tokenizer):
    model, _ = make_model("llama")
    forward = model.forward

    def slow(*args, **kwargs):
        time.sleep(0.1)  # a heavy model: the step holds its thread for 100 ms
        return forward(*args, **kwargs)

    model.forward = slow
    lags: list[float] = []
    done = trio.Event()

    async def heartbeat():
        while not done.is_set():
            t = time.perf_counter()
            await trio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    async with Engine(model, tokenizer, EngineConfig(overlap=True)) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            await engine.generate("a prompt", SamplingParams(max_new_tokens=4, ignore_eos=True))
            done.set()
    assert len(lags) > 100
    assert max(lags) < 0.05, f"worst heartbeat lag {max(lags) * 1e3:.1f} ms"


@on_trio
async def test_an_asyncio_caller_on_another_thread_is_refused_on_trio(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:

        def from_asyncio():
            async def call():
                return await engine.generate([5, 6], SamplingParams(max_new_tokens=2))

            try:
                asyncio.run(call())
            except WrongEventLoopError as e:
                return e
            return None

        def from_trio_thread():  # the supported way in: hand the call to the engine's trio loop
            return trio.from_thread.run(engine.generate, [5, 6], SamplingParams(max_new_tokens=2, ignore_eos=True))

        err = await trio.to_thread.run_sync(from_asyncio)
        out = await trio.to_thread.run_sync(from_trio_thread)
    assert isinstance(err, WrongEventLoopError) and "trio.from_thread.run" in str(err)
    assert len(out.token_ids) == 2


def test_an_engine_closed_on_trio_starts_again_on_asyncio(make_model, tokenizer):
    model, ref = make_model("llama", seed=8)
    prompt = random_prompts(1, [12], len(tokenizer), seed=8)[0]
    expected = reference_greedy(ref, prompt, 6)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def once():
        async with engine:
            return (await engine.generate(prompt, params)).token_ids

    assert trio.run(once) == expected
    assert asyncio.run(once()) == expected
    assert trio.run(once) == expected
