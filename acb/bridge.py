"""The completion bridge: await a launched step from the event loop without blocking it.

Two waits, in order:

1. the worker thread finished *launching* the step (on the CPU this is the whole computation): a
   ``concurrent.futures.Future`` wrapped for asyncio, woken by ``call_soon_threadsafe``;
2. on CUDA, the GPU finished it: the step's CUDA event is polled from the loop. The loop first sleeps through
   most of the step's predicted GPU time, then polls with ``sleep(0)`` (microsecond wake-up, other coroutines keep
   running) for up to 2 ms, then with 1 ms sleeps. Spinning longer would hold the GIL against the worker thread
   that launches the next step. No thread blocks on the GPU, so nothing depends on a GIL hand-off.

Steps of different shapes take very different times (an 8K-token prefill step ~190 ms, the decode steps after it
~7 ms), so there is one prediction per kind of step: decode-only or not, the token count's power of two, and the
number of sub-steps of a multi-step round.
Sharing one would make the loop oversleep through the first decode steps after every prefill.

The prediction learns only from waits it observed precisely (the event was still running when the loop woke):
if the event was already complete at wake-up, the loop overslept and the prediction shrinks instead. Without
that rule a busy loop inflates the observed waits, the prediction grows, and the loop oversleeps more and more.

``docs/gpu.md`` has the measured costs behind this choice (polling +9 µs; thread waits starve under a busy loop).

With tensor parallelism a step can wait forever: a worker process died while its peers' collectives waited for it,
and neither the launching thread nor the GPU may ever finish the step. A ``watch`` (the runner's worker check)
then runs every few milliseconds of both waits and raises, so the engine fails its requests at once instead of
waiting on a step that will not end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from . import aio
from .runner import StepHandle, StepResult

__all__ = ["CompletionBridge"]

_COARSE_MARGIN_S = 0.0015  # asyncio's timer granularity is ~1 ms: wake this much before the predicted end
_SPIN_WINDOW_S = 0.002  # poll with sleep(0) this long after waking, then fall back to 1 ms sleeps


_WATCH_S = 0.005  # with a watch: how often a wait checks it


class CompletionBridge:
    def __init__(self, watch: Callable[[], None] | None = None) -> None:
        """``watch``: raises when the step being waited for can no longer end (a tensor-parallel worker died)."""
        self._watch = watch
        # how long a step's GPU part lasts after its launch returned (learned), per kind of step
        self._predicted: dict[tuple, float] = {}

    async def wait(self, handle: StepHandle, loop: aio.Loop) -> StepResult:
        result = await aio.wait_future(loop, handle.future, self._watch, _WATCH_S)
        if result.event is not None:
            b = handle.batch
            await self._wait_event(result.event, (b.decode_only, b.num_tokens.bit_length(), b.num_steps))
        return result

    async def _wait_event(self, event, kind: tuple = (True, 0, 0)) -> None:
        start = time.perf_counter()
        predicted = self._predicted.get(kind, 0.0)
        if event.query():
            self._predicted[kind] = predicted * 0.9
            return
        if predicted > _COARSE_MARGIN_S:
            await anyio.sleep(predicted - _COARSE_MARGIN_S)
            if event.query():  # overslept (or exactly on time): the GPU part is shorter than predicted
                self._predicted[kind] = predicted * 0.9
                return
        spin_until = time.perf_counter() + _SPIN_WINDOW_S
        while not event.query():
            if self._watch is not None:
                self._watch()
            await anyio.sleep(0 if time.perf_counter() < spin_until else 0.001)
        took = time.perf_counter() - start
        self._predicted[kind] = took if predicted == 0.0 else 0.7 * predicted + 0.3 * took
