"""The completion bridge: await a launched step from the event loop without blocking it.

Two waits, in order:

1. the worker thread finished *launching* the step (on the CPU this is the whole computation): a
   ``concurrent.futures.Future`` wrapped for asyncio, woken by ``call_soon_threadsafe``;
2. on CUDA, the GPU finished it: the step's CUDA event is polled from the loop. The loop sleeps through most of
   the step's predicted remaining time (an average of recent steps), then polls: a short burst of ``sleep(0)``
   polls (microsecond latency), then ~1 ms sleeps. The sleeps matter: a loop that spins with ``sleep(0)`` holds the
   GIL and starves the worker thread that is launching the next step (measured on the H100 with the eager
   llama-8b path: spinning made async mode 25 % slower than sync). No thread blocks on the GPU, so nothing
   depends on a GIL hand-off.

``../shared/gpu.md`` has the measured costs behind this choice (polling +4 µs; thread waits starve under a busy loop).
"""

from __future__ import annotations

import asyncio
import time

from .runner import StepHandle, StepResult

__all__ = ["CompletionBridge"]

_COARSE_MARGIN_S = 0.0015  # asyncio's timer granularity is ~1 ms: wake this much before the predicted end
_SPIN_POLLS = 32  # sleep(0) polls (~tens of µs in all) before falling back to 1 ms sleeps


class CompletionBridge:
    def __init__(self) -> None:
        self._gpu_step_s = 0.0  # running average of how long a step's GPU part lasted after its launch returned

    async def wait(self, handle: StepHandle) -> StepResult:
        result = await asyncio.wrap_future(handle.future)
        if result.event is not None:
            await self._wait_event(result.event)
        return result

    async def _wait_event(self, event) -> None:
        start = time.perf_counter()
        if not event.query():
            remaining = self._gpu_step_s - _COARSE_MARGIN_S
            if remaining > 0:
                await asyncio.sleep(remaining)
            polls = 0
            while not event.query():
                polls += 1
                await asyncio.sleep(0 if polls <= _SPIN_POLLS else 0.001)
        took = time.perf_counter() - start
        self._gpu_step_s = took if self._gpu_step_s == 0.0 else 0.8 * self._gpu_step_s + 0.2 * took
