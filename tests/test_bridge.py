"""The completion bridge's CUDA-event wait, with a fake event (no GPU): it never blocks the loop, learns the step
duration from waits it observed, and shrinks its prediction when it overslept (no runaway under a busy loop)."""

from __future__ import annotations

import asyncio
import time

import pytest

from acb.bridge import CompletionBridge


class FakeEvent:
    def __init__(self, seconds: float) -> None:
        self.done_at = time.perf_counter() + seconds

    def query(self) -> bool:
        return time.perf_counter() >= self.done_at


async def test_learns_from_observed_waits_and_shrinks_after_oversleeping():
    bridge = CompletionBridge()
    await bridge._wait_event(FakeEvent(0.02))
    assert 0.019 <= bridge._predicted[(True, 0, 0)] < 0.2
    learned = bridge._predicted[(True, 0, 0)]
    await bridge._wait_event(FakeEvent(0.0))  # complete before the wait began
    assert bridge._predicted[(True, 0, 0)] < learned


async def test_a_busy_loop_does_not_inflate_the_prediction_without_bound():
    stop = asyncio.Event()

    async def hog():
        while not stop.is_set():
            end = time.perf_counter() + 0.004
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0)

    bridge = CompletionBridge()
    task = asyncio.create_task(hog())
    for _ in range(30):
        await bridge._wait_event(FakeEvent(0.005))
    stop.set()
    await task
    # observed waits include up to a 4 ms hog slice; oversleeping shrinks the prediction again
    assert bridge._predicted[(True, 0, 0)] < 0.005 + 0.004 * 2


async def test_the_loop_keeps_running_while_waiting():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    t = asyncio.create_task(ticker())
    await CompletionBridge()._wait_event(FakeEvent(0.05))
    t.cancel()
    assert ticks >= 10


async def test_each_kind_of_step_has_its_own_prediction():
    """A long prefill step must not make the loop oversleep through the short decode steps that follow it."""
    bridge = CompletionBridge()
    prefill, decode = (False, 14), (True, 6)
    await bridge._wait_event(FakeEvent(0.05), prefill)
    t = time.perf_counter()
    await bridge._wait_event(FakeEvent(0.002), decode)
    assert time.perf_counter() - t < 0.03  # not slept through the prefill's 50 ms
    assert bridge._predicted[prefill] > 0.04 and bridge._predicted[decode] < 0.02


class Dead(Exception):
    pass


def watch_that_fails_after(seconds: float):
    """A watch (the runner's worker check) that starts raising ``seconds`` from now, counting its calls."""
    calls = []
    at = time.perf_counter() + seconds

    def watch() -> None:
        calls.append(time.perf_counter())
        if time.perf_counter() >= at:
            raise Dead("a tensor-parallel worker died")

    return watch, calls


async def test_a_watch_ends_the_wait_for_a_launch_that_never_returns():
    """A worker died: the launching thread hangs in a collective forever; the wait raises within a few ms."""
    import concurrent.futures

    from acb import aio
    from acb.runner import StepHandle

    watch, calls = watch_that_fails_after(0.03)
    bridge = CompletionBridge(watch)
    never = concurrent.futures.Future()
    t0 = time.perf_counter()
    with pytest.raises(Dead):
        await bridge.wait(StepHandle(batch=None, future=never), aio.current_loop())
    assert time.perf_counter() - t0 < 0.5 and len(calls) >= 2


async def test_a_watch_ends_the_wait_for_a_gpu_event_that_never_completes():
    watch, _ = watch_that_fails_after(0.02)
    with pytest.raises(Dead):
        await asyncio.wait_for(CompletionBridge(watch)._wait_event(FakeEvent(3600)), 2)


async def test_a_launch_finishing_while_watched_returns_its_result_at_once():
    """The watch polls, but the thread's completion still wakes the wait (no polling delay), and the waits it
    abandoned leave no waiter behind."""
    import concurrent.futures
    import threading

    from acb import aio

    watch, calls = watch_that_fails_after(3600)
    future = concurrent.futures.Future()
    threading.Timer(0.05, future.set_result, args=("done",)).start()
    t0 = time.perf_counter()
    assert await aio.wait_future(aio.current_loop(), future, watch, every=1.0) == "done"
    assert time.perf_counter() - t0 < 0.5 and len(calls) == 1
    watch, calls = watch_that_fails_after(3600)
    future = concurrent.futures.Future()
    threading.Timer(0.1, future.set_result, args=("later",)).start()
    assert await aio.wait_future(aio.current_loop(), future, watch, every=0.01) == "later"
    assert len(calls) >= 5


async def test_a_signal_forgets_waiters_whose_wait_was_cancelled():
    from acb import aio

    signal = aio.Signal(aio.current_loop())
    for _ in range(5):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(signal.wait(), 0.001)
    assert signal._waiters == []
    signal.set()
    await signal.wait()
