"""The completion bridge: await a launched step from the event loop without blocking it.

Two waits, in order:

1. the worker thread finished *launching* the step (on the CPU this is the whole computation): a
   ``concurrent.futures.Future`` wrapped for asyncio, woken by ``call_soon_threadsafe``;
2. on CUDA, the GPU finished it: the step's CUDA event is polled from the loop. The loop sleeps through most of
   the step's predicted remaining time (an average of recent steps), then polls with ``sleep(0)`` so other
   coroutines keep running. No thread blocks on the GPU, so nothing depends on a GIL hand-off.

``../shared/gpu.md`` has the measured costs behind this choice (polling +4 µs; thread waits starve under a busy loop).
"""

from __future__ import annotations

import asyncio
import time

from .runner import StepHandle, StepResult

__all__ = ["CompletionBridge"]

_COARSE_MARGIN_S = 0.0015  # asyncio's timer granularity is ~1 ms: wake this much before the predicted end


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
            while not event.query():
                await asyncio.sleep(0)
        took = time.perf_counter() - start
        self._gpu_step_s = took if self._gpu_step_s == 0.0 else 0.8 * self._gpu_step_s + 0.2 * took
