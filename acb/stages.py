"""The pipeline's stage coroutines, and how a request ends: the half of :class:`acb.Engine` that runs once it started.

:class:`Stages` is a mixin of the engine: its methods are the engine's (they read the engine's scheduler, batch
builder, runner, bridge, queues and live requests, built in ``Engine._build``), kept here so that ``engine.py`` holds
the public API and the lifecycle, and this module the three loops that ``Engine.start`` spawns:

- ``_step_loop``: scheduling, batch preparation and launch (the launch itself runs on the step worker thread);
- ``_completion_loop``: awaits each launched step's completion and accepts its tokens;
- ``_detok_loop``: detokenization and delivery to each request's stream.

Requests end in three ways here: aborted (a stream let go, ``engine.abort``), failed (a step that could not be
prepared or run, non-finite logits, a tokenizer error: only the requests concerned), or finished (their stream
closed after the last token). Each frees its KV blocks at once.
"""

from __future__ import annotations

import logging
import time

from .errors import RequestFailedError, WorkerFailedError
from .outputs import Token
from .scheduler import ScheduledStep
from .stream import RequestState

__all__ = ["Stages"]

log = logging.getLogger("acb")


class Stages:
    # -- stage: scheduling, batch preparation and launch ----------------------------------------------------------

    async def _step_loop(self) -> None:
        while True:
            await self._inflight.acquire()
            while True:
                t0 = time.perf_counter()
                self._pull_admissions()
                step = self._scheduler.schedule()
                if step is not None:
                    break
                self._work.clear()
                await self._work.wait()
            try:
                batch = self._builder.build(step)
                t1 = time.perf_counter()
                handle = self._runner.launch(batch)
                self.tracer.add("prepare", t0, t1)
                self.tracer.add("launch", t1, time.perf_counter())
            except Exception as exc:  # a bad batch fails its own requests, not the engine
                log.exception("preparing step %d failed", step.step_id)
                self._isolate_failed_step(step, exc)
                self._inflight.release()
                continue
            self._steps += step.num_steps
            self._launched.put_nowait(handle)

    def _isolate_failed_step(self, step: ScheduledStep, exc: Exception) -> None:
        """Preparing ``step`` raised: fail only the requests whose own row cannot be prepared, and put the others
        back as if the step had never been scheduled. If no single row fails alone, the step's requests fail."""
        culprits = self._builder.culprits(step) or [(seq, exc) for seq in step.seqs]
        self._scheduler.unschedule(step)
        for seq, cause in culprits:
            self._fail(self._live.get(seq.request_id), RequestFailedError(f"preparing a step failed: {cause!r}"), cause)

    def _pull_admissions(self) -> None:
        for state in self._queue.take(self._scheduler.room_for_new):
            self._scheduler.add(state.seq)
        self._scheduler.backlog = self._queue.num_queued

    # -- stage: completion --------------------------------------------------------------------------------------

    async def _completion_loop(self) -> None:
        overlap = self.config.overlap
        while True:
            handle = await self._launched.get()
            step = handle.batch.step
            out = None
            try:
                t0 = time.perf_counter()
                result = await self._bridge.wait(handle, self._loop)
                self._runner.check_workers()
                t1 = time.perf_counter()
                self.tracer.add("wait", t0, t1)
                tokens = result.tokens.tolist()
                logprobs = None if result.logprobs is None else result.logprobs.tolist()
                top = None if result.top is None else (result.top[0].tolist(), result.top[1].tolist())
                out = self._scheduler.on_step_done(step, tokens, logprobs, top)
            except WorkerFailedError:
                raise  # the model is gone with its worker: the engine stops (_guard fails every live request)
            except Exception as exc:
                log.exception("step %d failed", step.step_id)
                self._builder.invalidate()  # the step's block-table entries may not have reached the device
                for seq in self._scheduler.on_step_failed(step):
                    self._fail(self._live.get(seq.request_id), RequestFailedError(f"step failed: {exc!r}"), exc)
            else:
                for seq in out.broken:
                    self._fail(
                        self._live.get(seq.request_id),
                        RequestFailedError("the model produced non-finite logits (NaN or infinity) for this request"),
                    )
                self.tracer.add("process", t1, time.perf_counter())
                if out.accepted and not overlap:  # sync mode: deliver, then prepare the next step
                    self._to_detok.put_nowait(out)
            finally:
                self._inflight.release()
                self._work.set()
            # Overlap mode queues the tokens after waking the step loop, so the next step is prepared and launched
            # before these are detokenized: delivery stays off the host's path between two GPU steps.
            if out is not None and out.accepted and overlap:
                self._to_detok.put_nowait(out)

    # -- stage: detokenization and delivery -----------------------------------------------------------------------

    async def _detok_loop(self) -> None:
        while True:
            out = await self._to_detok.get()
            t0 = time.perf_counter()
            ended, stopped, failed = self._delivery.deliver(out, self._live)
            for state, exc in failed:
                self._fail(state, RequestFailedError(f"detokenization failed: {exc!r}"), exc)
            for seq in stopped:
                self._scheduler.finish(seq, "stop")
            if stopped:
                self._work.set()
            for state in ended:
                self._forget(state)
            self.tracer.add("detokenize", t0, time.perf_counter())

    # -- request endings ----------------------------------------------------------------------------------------

    def _abort(self, state: RequestState) -> None:
        self._scheduler.finish(state.seq, "abort")
        state.end(Token(None, "", None, "abort", None))
        self._forget(state)
        self._work.set()

    def _abort_threadsafe(self, state: RequestState) -> None:
        """Abort from anywhere (a stream's finalizer may run on another thread)."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._live.get(state.seq.request_id) is not state:
            return
        if loop.is_current():
            self._abort(state)
        else:
            loop.call_soon_threadsafe(self._abort_if_live, state)

    def _abort_if_live(self, state: RequestState) -> None:
        if self._live.get(state.seq.request_id) is state:
            self._abort(state)

    def _fail(self, state: RequestState | None, error: Exception, cause: BaseException | None = None) -> None:
        if state is None:
            return
        if cause is not None:
            error.__cause__ = cause
        self._scheduler.finish(state.seq, "error")
        state.end(error)
        self._forget(state)
        self._work.set()

    def _forget(self, state: RequestState) -> None:
        self._queue.remove(state)
        if self._live.get(state.seq.request_id) is state:
            del self._live[state.seq.request_id]
            if not state.seq.is_finished:
                self._scheduler.finish(state.seq, "abort")
        if not self._live:
            self._idle.set()
