"""The engine's lifecycle: the half of :class:`acb.Engine` that starts its stages and stops them.

:class:`Lifecycle` is a mixin of the engine, between the stages (:mod:`acb.stages`, which it spawns) and the public
API (:mod:`acb.engine`, which builds what the stages run on in ``Engine._build``). An engine goes

    new --start()--> running --close()--> closing --> closed --start()--> starting --> new --> running ...

and ``failed`` when a stage crashed (``close()`` then only stops what is left). Whatever interrupts it, ``close()``
ends with the pipeline stopped and the model given back: only its drain is cancellable, and an engine whose event
loop ended under it is torn down from the next loop. The checks on the way in (``_check_open``, ``_check_loop``) are
here too: they say which state refuses a caller.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Self

import anyio
import torch

from . import aio, warmup
from .errors import EngineClosedError, RequestFailedError, WrongEventLoopError
from .model_setup import release_model
from .stages import Stages

__all__ = ["Lifecycle"]

log = logging.getLogger("acb")


class Lifecycle(Stages):
    """Start, close and the state between (see the module doc); a mixin of :class:`acb.Engine`."""

    @property
    def state(self) -> str:
        """``"new"``, ``"starting"`` (a closed engine being built anew by ``start()``), ``"running"``,
        ``"closing"``, ``"closed"`` or ``"failed"``."""
        return self._state

    @property
    def running(self) -> bool:
        """Whether the engine accepts requests now."""
        return self._state == "running"

    async def start(self) -> None:
        """Start the pipeline tasks on the running event loop. A closed engine starts anew: it takes the model over
        again and builds a fresh KV cache (what was cached before is gone), in a worker thread (on CUDA that
        includes capturing the decode graphs, seconds that the loop keeps serving through)."""
        if self._state == "closed":
            self._state, self._built = "starting", anyio.Event()
            try:  # the build runs to its end even if this start() is cancelled (aio.run_to_end)
                await aio.run_to_end(lambda: anyio.to_thread.run_sync(self._build_here), "acb-build")
            except BaseException:
                if self._state == "new":  # built, then cancelled: give the model back
                    await self.close()
                self._state = "closed"
                raise
            finally:
                self._built.set()
        if self._state != "new":
            raise EngineClosedError(f"the engine cannot be started now (it is {self._state})")
        self._loop = loop = aio.current_loop()
        self._launched: aio.Mailbox = aio.Mailbox(loop)  # of StepHandle
        self._to_detok: aio.Mailbox = aio.Mailbox(loop)  # of StepOutput
        self._inflight = aio.Slots(loop, self.config.overlap_depth if self.config.overlap else 1)
        self._work = aio.Signal(loop)
        self._idle = aio.Signal(loop)
        self._idle.set()
        self._closing = aio.Signal(loop)
        self._tasks = [
            loop.spawn(lambda: self._guard(self._step_loop), "acb-step-loop"),
            loop.spawn(lambda: self._guard(self._completion_loop), "acb-completion-loop"),
            loop.spawn(lambda: self._guard(self._detok_loop), "acb-detok-loop"),
        ]
        self._state = "running"
        log.info("acb engine started on %s: %s", self.device, self.path_reason)
        warmup = self.config.warmup if self.config.warmup is not None else self.device.type == "cuda"
        if warmup:
            t0 = time.perf_counter()
            try:
                await self._warm_up()
            except BaseException:  # start() fails as a whole: nothing of this engine keeps running or holds the model
                await self.close(drain=False)
                raise
            self.startup["warmup_s"] = time.perf_counter() - t0
            log.info("acb warm-up: %.2f s", self.startup["warmup_s"])

    async def _warm_up(self) -> None:
        await warmup.run(self)

    def _reset_counters(self) -> None:
        """The counters of ``stats()`` start again (after the warm-up)."""
        self._steps = 0
        self._scheduler.num_preemptions = 0
        self._blocks.stats = type(self._blocks.stats)()

    async def close(self, *, drain: bool = True) -> None:
        """Stop accepting requests, let running ones finish (up to ``drain_timeout``), fail the rest with
        :class:`EngineClosedError`, and stop the pipeline.

        Returns within about ``drain_timeout`` even if a step never completes (a hung kernel): the step's worker
        thread is then left behind, and the engine's memory with it."""
        if self._state == "starting":  # a restart is building the engine in a worker thread: close what it built
            await self._built.wait()
        if self._state in ("new", "closed"):
            if self._state == "new":
                self._runner.close(timeout=0)  # never started: no step ran; frees the model at once
                release_model(self.model, self._original_attention)
            self._state = "closed"
            return
        deadline = time.monotonic() + self.config.drain_timeout
        if self._loop.is_closed():  # the loop it ran on has ended: its tasks and requests ended with it
            self._live.clear()
            self._admitting.clear()
            self._follows.clear()
            await self._stop_workers(deadline)
            self._state = "closed"
            return
        self._check_loop()
        if self._state == "failed":  # its stages already failed every request: stop what is left
            self._state, self._closed_event = "closing", aio.Signal(self._loop)
            await aio.run_to_end(lambda: self._teardown(deadline), "acb-close")
            return
        if self._state == "closing":
            await self._closed_event.wait()
            return
        self._state = "closing"
        self._closed_event = aio.Signal(self._loop)
        self._closing.set()
        self._queue.wake_all()  # submitters waiting for room see the engine closing and raise EngineClosedError
        try:
            if drain and self._live:
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    await self._idle.wait()
        finally:  # only the drain is cancellable: a close() cancelled (a timeout around it, Ctrl-C) still stops
            # the pipeline and gives the model back before its cancellation goes on
            await aio.run_to_end(lambda: self._teardown(deadline), "acb-close")

    async def _teardown(self, deadline: float) -> None:
        """Fail what is left, stop the stages and the workers, give the model back; then the engine is closed."""
        try:
            for state in list(self._live.values()):
                self._fail(state, EngineClosedError("the engine closed before this request finished"))
            await self._stop_tasks()
            await self._stop_workers(deadline)
        finally:
            self._state = "closed"
            self._closed_event.set()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            await task.wait()

    async def _stop_workers(self, deadline: float) -> None:
        self._admission.close()
        # At least a moment for a step that is about to finish, even with drain_timeout=0.
        grace = max(0.5, deadline - time.monotonic())
        if not await anyio.to_thread.run_sync(functools.partial(self._runner.close, timeout=grace)):
            log.error("a model step did not finish within drain_timeout; its worker thread is left running")
        else:
            release_model(self.model, self._original_attention)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.close(drain=exc_type is None)

    def _build_here(self) -> None:
        """:meth:`_build` in a worker thread, on the engine's device (a thread's current CUDA device is the first)."""
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            self._build()

    async def _guard(self, stage: Callable[[], Awaitable[None]]) -> None:
        """Run a pipeline stage; if it dies of a bug, fail every live request and refuse new ones instead of
        leaving streams hanging."""
        try:
            await stage()
        except aio.cancelled_exc_class():
            raise
        except BaseException as exc:
            log.critical("an acb pipeline stage crashed; the engine stops serving", exc_info=True)
            self._state = "failed"
            self._closing.set()
            for state in list(self._live.values()):
                self._fail(state, RequestFailedError(f"the engine failed: {exc!r}"), exc)
            raise

    def _check_open(self) -> None:
        if self._state != "running":
            raise EngineClosedError(
                "the engine is not running: use `async with engine:` (or `await engine.start()`)"
                if self._state == "new"
                else f"the engine is {self._state}"
            )

    def _check_loop(self) -> None:
        """Refuse a caller on another event loop before it touches any state (microseconds)."""
        loop = self._loop
        if loop is not None and loop.is_closed() and self._state in ("running", "closing", "failed"):
            raise EngineClosedError(
                "the event loop this engine was started on has ended without closing it; `await engine.close()` "
                "(on any loop), then start it again"
            )
        if loop is not None and not loop.is_closed() and not loop.is_current():
            raise WrongEventLoopError(
                "this engine runs on another event loop (it was started there); use it from that loop, e.g. with "
                "asyncio.run_coroutine_threadsafe(coro, loop) (on trio: trio.from_thread.run) from another thread"
            )
