"""The completion bridge's CUDA-event wait, with a fake event (no GPU): it never blocks the loop, learns the step
duration from waits it observed, and shrinks its prediction when it overslept (no runaway under a busy loop)."""

from __future__ import annotations

import asyncio
import time

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
