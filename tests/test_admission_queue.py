"""The admission queue's line for room (``max_pending``) and admission's tokenizer thread around ``close()``.

Submitters that find the queue full wait in line, first come first served; a place that comes free is handed to the
first in line, and one who leaves holding it passes it on. Work queued in the tokenizer thread when the engine
closes ends with :class:`EngineClosedError`, and a closed engine starts no thread."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from acb import Engine, EngineConfig, SamplingParams, aio
from acb.admission import AdmissionQueue
from acb.errors import EngineClosedError

LONG = SamplingParams(max_new_tokens=1500, ignore_eos=True)
SHORT = SamplingParams(max_new_tokens=4, ignore_eos=True)


class S:
    def __init__(self, arrival, max_new=10, prompt=3):
        self.seq = SimpleNamespace(arrival=arrival, max_len=prompt + max_new, num_prompt=prompt)
        self.queued = False
        self.closed = False


def _never():
    return None


async def _submit(q, loop, st, log):
    await q.wait_for_room(st, loop, _never)
    q.put(st)
    log.append(st.seq.arrival)


async def test_a_cancelled_woken_waiter_passes_its_place_on():
    """max_pending=1: A queued, B and C blocked. take(A) gives the place to B; B's task is cancelled before it runs
    (a client timeout at that moment): C gets the place (it used to wait forever)."""
    loop = aio.current_loop()
    q = AdmissionQueue(max_pending=1)
    a, b, c = S(0), S(1), S(2)
    q.put(a)
    log = []
    tb = asyncio.create_task(_submit(q, loop, b, log))
    tc = asyncio.create_task(_submit(q, loop, c, log))
    await asyncio.sleep(0.01)
    assert q.num_blocked == 2
    assert q.take(1) == [a]  # wakes B (room for one)
    tb.cancel()  # B cancelled before it ran: the engine's _submit then calls _forget -> q.remove(b)
    try:
        await tb
    except asyncio.CancelledError:
        pass
    q.remove(b)  # what Stages._submit's except clause does via _forget
    await asyncio.sleep(0.05)
    assert log == [2], f"C still blocked with an empty queue: blocked={q.num_blocked} queued={q.num_queued}"
    assert (q.num_queued, q.num_blocked) == (1, 0)
    await tc


async def test_a_newcomer_waits_behind_the_line():
    """max_pending=1: A queued, B then C blocked. A is taken; before B runs, a new submitter D arrives: the place is
    B's, and D waits behind C (it used to take the place, and B went to the back of the line: D, C, B)."""
    loop = aio.current_loop()
    q = AdmissionQueue(max_pending=1)
    a, b, c, d = S(0), S(1), S(2), S(3)
    q.put(a)
    log = []
    tb = asyncio.create_task(_submit(q, loop, b, log))
    tc = asyncio.create_task(_submit(q, loop, c, log))
    await asyncio.sleep(0.01)
    td = asyncio.create_task(_submit(q, loop, d, log))  # scheduled before B's wake-up
    q.take(1)  # A leaves: B woken
    await asyncio.sleep(0.01)
    for _ in range(3):
        q.take(1)
        await asyncio.sleep(0.01)
    await asyncio.gather(tb, tc, td)
    assert log == [1, 2, 3], f"served order {log} (B=1 blocked first)"


@pytest.mark.loops("asyncio")
async def test_engine_a_cancelled_submitter_woken_for_room_does_not_strand_the_next(make_model, tokenizer):
    """max_num_seqs=1, max_pending=1: R runs, A is queued, B and C wait for room. A is aborted (room for one: B is
    woken) and, before B's task runs, B is cancelled (its client timed out). C must get A's place; it never does,
    even after the engine goes idle."""
    model, _ = make_model("llama")
    config = EngineConfig(max_num_seqs=1, max_pending=1, admission_group=1)
    async with Engine(model, tokenizer, config) as engine:
        r = await engine.submit([5, 6, 7], LONG, request_id="R")
        first = await anext(r)
        assert first.id is not None
        _a = await engine.submit([5, 6, 8], SHORT, request_id="A")  # queued (R holds the only slot); held
        tb = asyncio.create_task(engine.generate([5, 6, 9], SHORT, request_id="B"))
        await asyncio.sleep(0.05)
        tc = asyncio.create_task(engine.generate([5, 6, 10], SHORT, request_id="C"))
        await asyncio.sleep(0.05)
        s = engine.stats()
        assert (s.num_running, s.num_waiting, s.num_pending) == (1, 1, 2), s
        engine.abort("A")  # room for one: B is woken
        tb.cancel()  # ... and cancelled before it runs
        await asyncio.gather(tb, return_exceptions=True)
        await r.aclose()  # the slot frees too: nothing is left but C
        done, _ = await asyncio.wait([tc], timeout=3)
        s = engine.stats()
        if not done:
            pytest.fail(
                f"C never admitted after 3 s with the engine idle: running={s.num_running} "
                f"waiting={s.num_waiting} pending={s.num_pending} queued={engine._queue.num_queued}"
            )
        assert tc.result().finish_reason == "length"


@pytest.mark.loops("asyncio")
async def test_engine_blocked_submitters_are_served_first_come_first_served(make_model, tokenizer):
    """max_pending=1 under load: B, then C, wait for room; D arrives later. With admission_order="arrival", B must
    not be served after both C and D: it loses its place when a newcomer takes the room it was woken for."""
    model, _ = make_model("llama")
    config = EngineConfig(max_num_seqs=1, max_pending=1, admission_group=1)
    order = []
    async with Engine(model, tokenizer, config) as engine:
        r = await engine.submit([5, 6, 7], LONG, request_id="R")
        await anext(r)
        _a = await engine.submit([5, 6, 8], SHORT, request_id="A")  # queued; held (a dropped stream aborts)

        async def one(rid, p):
            out = await engine.generate(p, SHORT, request_id=rid)
            order.append(rid)
            return out

        tb = asyncio.create_task(one("B", [5, 6, 9]))
        await asyncio.sleep(0.05)
        tc = asyncio.create_task(one("C", [5, 6, 10]))
        await asyncio.sleep(0.05)
        td = asyncio.create_task(one("D", [5, 6, 11]))  # a newcomer, ready to run
        engine.abort("A")  # room for one: B woken, but D's task runs first
        await asyncio.sleep(0.05)
        await r.aclose()
        await asyncio.wait_for(asyncio.gather(tb, tc, td), 20)
    assert order == ["B", "C", "D"], order


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("b_work", ["stop strings", "long prompt"])
async def test_closing_while_work_waits_for_the_tokenizer_thread_gives_a_typed_error(make_model, tokenizer, b_work):
    """A's long prompt is being tokenized in the tokenizer thread; B's work (stop strings over 1 KiB, or another long
    prompt) waits behind it there. close() shuts the thread down: B gets EngineClosedError (it used to get a bare
    concurrent.futures.CancelledError, or RequestFailedError("tokenizing the prompt failed"), as if the tokenizer
    had a bug)."""
    model, _ = make_model("llama")
    encode = tokenizer.encode
    started = threading.Event()

    def slow_encode(text, *a, **k):
        if threading.current_thread() is not threading.main_thread():
            started.set()
            time.sleep(0.5)
        return encode(text, *a, **k)

    engine = Engine(model, tokenizer, EngineConfig(long_prompt_chars=64, drain_timeout=0.1))
    engine._admission.tokenizer = type("T", (), {"encode": staticmethod(slow_encode)})()
    await engine.start()
    ta = asyncio.create_task(engine.generate("hello " * 40, SHORT, request_id="A"))
    while not started.is_set():
        await asyncio.sleep(0.005)
    if b_work == "stop strings":  # > 1024 characters: compiled in the tokenizer thread
        stops = [f"stop{i:04d}" + "x" * 20 for i in range(50)]
        b = engine.generate([5, 6, 7], SamplingParams(max_new_tokens=4, stop=stops), request_id="B")
    else:
        b = engine.generate("world " * 40, SHORT, request_id="B")
    tb = asyncio.create_task(b)
    await asyncio.sleep(0.02)
    await engine.close()
    ra, rb = await asyncio.gather(ta, tb, return_exceptions=True)
    assert isinstance(ra, EngineClosedError), repr(ra)
    assert isinstance(rb, EngineClosedError), f"B got {type(rb).__module__}.{type(rb).__name__}: {rb!r}"


def _tok_threads():
    return [t for t in threading.enumerate() if t.name.startswith("acb-tokenizer")]


@pytest.mark.loops("asyncio")
async def test_a_closed_engine_starts_no_tokenizer_thread(make_model, tokenizer):
    model, _ = make_model("llama")
    engine = Engine(model, tokenizer, EngineConfig(long_prompt_chars=64))
    async with engine:
        pass
    before = len(_tok_threads())
    with pytest.raises(EngineClosedError):
        await engine.generate_choices("hello " * 40, SamplingParams(max_new_tokens=2, n=2))
    assert len(_tok_threads()) == before, f"{len(_tok_threads()) - before} acb-tokenizer thread(s) started after close"


async def test_every_live_request_is_counted_once_at_every_moment(make_model, tokenizer):
    """EngineStats: running + waiting + pending is every live request, at every moment (a request that finished in
    the scheduler but whose last tokens are not delivered yet used to be counted nowhere)."""
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(max_num_seqs=4, max_pending=4)) as engine:
        params = [SamplingParams(max_new_tokens=3 + i % 4, ignore_eos=True) for i in range(16)]
        tasks = [asyncio.create_task(engine.generate([5, 6, 7 + i], p)) for i, p in enumerate(params)]
        bad = []
        while not all(t.done() for t in tasks):
            s = engine.stats()
            if s.num_running + s.num_waiting + s.num_pending != len(engine._live):
                bad.append((s, len(engine._live)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    assert not bad, f"{len(bad)} snapshots miscounted, e.g. {bad[0]}"


async def test_abort_by_id_while_the_prompt_is_tokenized_ends_the_request(make_model, tokenizer):
    """``engine.abort(id)`` for a request still being tokenized (a long prompt, in the tokenizer thread) returns True
    and the request ends with the abort marker as soon as it exists (it used to return False, and the request ran);
    a second submit with that id meanwhile is refused as a duplicate."""
    from acb.errors import DuplicateRequestIdError

    model, _ = make_model("llama")
    encode = tokenizer.encode
    started, release = threading.Event(), threading.Event()

    def slow_encode(text, *a, **k):
        if threading.current_thread() is not threading.main_thread():
            started.set()
            release.wait(10)
        return encode(text, *a, **k)

    async with Engine(model, tokenizer, EngineConfig(long_prompt_chars=64)) as engine:
        engine._admission.tokenizer = type("T", (), {"encode": staticmethod(slow_encode)})()
        task = asyncio.create_task(engine.generate("hello " * 40, LONG, request_id="early"))
        while not started.is_set():
            await asyncio.sleep(0.005)
        with pytest.raises(DuplicateRequestIdError):
            await engine.generate([5, 6, 7], SHORT, request_id="early")
        assert engine.abort("early") is True
        release.set()
        out = await task
        assert out.finish_reason == "abort" and out.token_ids == []
        assert engine.abort("early") is False  # gone
        s = engine.stats()
        assert s.kv_blocks_free == s.kv_blocks_total and s.num_running == s.num_waiting == 0
        assert (await engine.generate([5, 6, 7], SHORT, request_id="early")).finish_reason == "length"
