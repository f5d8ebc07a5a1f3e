"""A request's stream: one consumer, ended by leaving the loop or the ``async with`` block, and usable from the
engine's own event loop only."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import reference_greedy

from acb import (
    Engine,
    EngineConfig,
    InvalidPromptError,
    SamplingParams,
    StreamInUseError,
    WrongEventLoopError,
)

LONG = SamplingParams(max_new_tokens=500, ignore_eos=True)


def _idle(engine: Engine) -> bool:
    s = engine.stats()
    return s.kv_blocks_free == s.kv_blocks_total and s.num_running == s.num_waiting == s.num_pending == 0


async def test_break_ends_the_request_even_while_the_stream_is_held(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=4)) as engine:
        s = engine.stream("a fairly long prompt to hold several blocks", LONG)
        async for _ in s:
            assert not _idle(engine)
            break
        assert _idle(engine)  # at once: no await, no garbage collection, and `s` is still referenced
        assert [t async for t in s] == []  # the ended stream yields nothing more

        s2 = engine.stream("another prompt", LONG)
        with pytest.raises(KeyError):
            async for _ in s2:
                raise KeyError("the consumer's own error")
        assert _idle(engine)
        del s, s2


async def test_async_with_submits_on_entry_and_ends_on_exit(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer) as engine:
        async with engine.stream("hello", LONG) as s:
            assert engine.stats().num_running + engine.stats().num_waiting == 1  # submitted before any iteration
            first = await s.__anext__()
            assert first.id is not None
        assert _idle(engine)
        with pytest.raises(InvalidPromptError):  # admission errors surface on entry
            async with engine.stream("", LONG):
                pass
        async with engine.stream([5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True)) as s:
            got = [t.id async for t in s]
        assert len(got) == 3 and _idle(engine)


async def test_a_second_consumer_gets_a_clear_error_and_the_first_is_unaffected(make_model, tokenizer):
    model, ref = make_model("llama")
    want = reference_greedy(ref, [5, 6, 7], 30)
    async with Engine(model, tokenizer) as engine:
        s = engine.stream([5, 6, 7], SamplingParams(max_new_tokens=30, ignore_eos=True))
        started = asyncio.Event()

        async def first():
            ids = []
            async for t in s:
                ids.append(t.id)
                started.set()
                await asyncio.sleep(0)
            return ids

        async def second():
            await started.wait()
            async for _ in s:
                pass

        a = asyncio.create_task(first())
        with pytest.raises(StreamInUseError):
            await second()
        with pytest.raises(StreamInUseError):  # nor may another task read it directly mid-iteration
            await asyncio.gather(s.__anext__(), s.__anext__())
        assert await a == want
        assert _idle(engine)


async def test_another_event_loop_is_refused_at_once_and_the_engine_keeps_serving(make_model, tokenizer):
    model, ref = make_model("llama")
    want = reference_greedy(ref, [5, 6, 7], 8)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine = Engine(model, tokenizer, EngineConfig(drain_timeout=5))
    async with engine:
        errors: list[BaseException] = []

        def elsewhere():
            async def use():
                for call in (
                    lambda: engine.generate([5, 6, 7], params),
                    lambda: engine.apply_chat_template([{"role": "user", "content": "x"}]),
                    lambda: engine.close(),
                ):
                    try:
                        await call()
                    except BaseException as exc:
                        errors.append(exc)

            loop = asyncio.new_event_loop()
            loop.set_debug(True)  # this once wedged the engine so that close() never returned
            try:
                loop.run_until_complete(asyncio.wait_for(use(), 5))
            finally:
                loop.close()

        t = threading.Thread(target=elsewhere)
        t.start()
        await asyncio.to_thread(t.join)
        assert len(errors) == 3 and all(isinstance(e, WrongEventLoopError) for e in errors), errors
        assert (await engine.generate([5, 6, 7], params)).token_ids == want
        # abort() works from any thread: it is handed to the engine's loop
        s = engine.stream([5, 6, 7], LONG, request_id="x")
        await s.__anext__()
        assert await asyncio.to_thread(engine.abort, "x") is True
        rest = [t async for t in s]
        assert rest[-1].finish_reason == "abort"
    async with asyncio.timeout(10):
        await engine.close()
