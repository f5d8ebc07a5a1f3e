"""The pipeline's stages, and how a request ends: the half of :class:`acb.Engine` that runs once it started.

:class:`Stages` is a mixin of the engine: its methods are the engine's (they read the engine's scheduler, batch
builder, runner, bridge, queues and live requests, built in ``Engine._build``), kept here so that ``engine.py`` holds
the public API, ``lifecycle.py`` the starting and stopping, and this module the four stages: admission, which runs in
the task of whoever submits (``_submit``: validate, tokenize, queue with backpressure), and the three loops that
``Engine.start`` spawns:

- ``_step_loop``: scheduling, batch preparation and launch (the launch itself runs on the step worker thread);
- ``_completion_loop``: awaits each launched step's completion and accepts its tokens;
- ``_detok_loop``: detokenization and delivery to each request's stream.

Requests end in three ways here: aborted (a stream let go, ``engine.abort``), failed (a step that could not be
prepared or run, non-finite logits, a tokenizer error: only the requests concerned), or finished (their stream
closed after the last token). Each frees its KV blocks at once. A request that a step fails gets its error through
the delivery stage, behind the tokens already accepted for it: its stream reads every token generated before the
failure, then the error, however far delivery lags behind the step loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import DuplicateRequestIdError, InvalidRequestError, RequestFailedError, WorkerFailedError
from .outputs import Token
from .scheduler import ScheduledStep, StepOutput
from .sequence import Sequence
from .stream import RequestState

if TYPE_CHECKING:
    from .admission import Prompt
    from .config import SamplingParams

__all__ = ["Stages"]

log = logging.getLogger("acb")


class _Failure:
    """A request's error, queued for delivery behind the tokens accepted for it before (``_fail_in_order``)."""

    __slots__ = ("state", "error")

    def __init__(self, state: RequestState, error: Exception) -> None:
        self.state = state
        self.error = error


class Stages:
    # -- stage: admission, in the caller's task -------------------------------------------------------------------

    async def _submit(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None,
        attach: Callable[[RequestState], None] | None = None,
        stream_interval: int = 1,
    ) -> RequestState:
        """Admit one request: validate, tokenize, then queue it for the scheduler (waiting for room under
        ``max_pending``). ``attach`` receives the request's state as soon as it exists, before any wait for room, so
        that its stream can abort it while it waits."""
        t0 = time.perf_counter()
        self._check_open()
        if not isinstance(request_id, str):
            raise InvalidRequestError(
                f"request_id must be a string, got {type(request_id).__name__}", param="request_id"
            )
        params = self._admission.check_params(params if params is not None else self.default_params)
        if request_id in self._live or request_id in self._admitting:
            raise DuplicateRequestIdError(f"request_id {request_id!r} is already in use")
        self._admitting[request_id] = False  # True once abort(request_id) asks for it while it is prepared
        try:
            stops = await self._admission.stop_strings(params)
            grammar = await self._admission.grammar(params)
            ids = await self._admission.tokenize(prompt)
            self._admission.check_fits(len(ids), params)
            self._check_open()
        finally:
            aborted = self._admitting.pop(request_id)
        seed = (params.seed if params.seed is not None else random.getrandbits(32)) % (1 << 32)
        seq = Sequence(
            request_id,
            next(self._arrivals),
            ids,
            params,
            max_model_len=self.max_model_len,
            eos_ids=self._eos_ids,
            seed=seed,
        )
        seq.grammar = grammar
        seq.after = self._follows.get(request_id)
        state = RequestState(seq, self._delivery.decoder.new_state(), stops, stream_interval)
        self.tracer.add("admission", t0, time.perf_counter())
        self._live[request_id] = state
        self._idle.clear()
        if attach is not None:
            attach(state)
        if aborted:  # engine.abort() came while it was tokenized: it ends now, with the abort marker
            self._abort(state)
            return state
        try:
            await self._queue.wait_for_room(state, self._loop, self._check_open)  # backpressure
        except BaseException:
            self._forget(state)
            raise
        if state.closed:
            return state  # aborted before it was queued: its stream reads the abort marker
        self._queue.put(state)
        self._work.set()
        return state

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
            error = RequestFailedError(f"preparing a step failed: {cause!r}")
            self._fail_in_order(self._live.get(seq.request_id), error, cause)

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
                    error = RequestFailedError(f"step failed: {exc!r}")
                    self._fail_in_order(self._live.get(seq.request_id), error, exc)
            else:
                self.tracer.add("process", t1, time.perf_counter())
                if not overlap:  # sync mode: deliver, then prepare the next step
                    self._hand_over(out)
            finally:
                self._inflight.release()
                self._work.set()
            # Overlap mode queues the tokens after waking the step loop, so the next step is prepared and launched
            # before these are detokenized: delivery stays off the host's path between two GPU steps.
            if out is not None and overlap:
                self._hand_over(out)

    def _hand_over(self, out: StepOutput) -> None:
        """Queue a step's tokens for delivery, then the errors of its broken rows (a multi-step round's row keeps
        the tokens it sampled before the broken one)."""
        if out.accepted:
            self._to_detok.put_nowait(out)
        for seq in out.broken:
            error = RequestFailedError("the model produced non-finite logits (NaN or infinity) for this request")
            self._fail_in_order(self._live.get(seq.request_id), error)

    # -- stage: detokenization and delivery -----------------------------------------------------------------------

    async def _detok_loop(self) -> None:
        while True:
            out = await self._to_detok.get()
            if type(out) is _Failure:  # after every token accepted for the request before it failed
                self._fail(out.state, out.error)
                continue
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
        """End a request with ``error`` now: its stream reads the error after what was delivered to it so far
        (tokens accepted but still queued for delivery are dropped; see :meth:`_fail_in_order`)."""
        if state is None:
            return
        if cause is not None:
            error.__cause__ = cause
        self._scheduler.finish(state.seq, "error")
        state.end(error)
        self._forget(state)
        self._work.set()

    def _fail_in_order(self, state: RequestState | None, error: Exception, cause: BaseException | None = None) -> None:
        """Fail a request that a step could not be prepared or run for. It stops at once (the scheduler lets its
        blocks go, and no step still in flight adds tokens to it), but its error is queued for the delivery stage
        behind the tokens already accepted for it, which may still wait there (with overlap, the next step is
        prepared before the previous one's tokens are detokenized): its stream reads every token generated before
        the failure, then the error, whatever the timing of the stages. If the engine stops first, ``close`` (or
        the crash guard) fails the request at once, as it is still live."""
        if state is None:
            return
        if cause is not None:
            error.__cause__ = cause
        self._scheduler.finish(state.seq, "error")
        self._work.set()
        self._to_detok.put_nowait(_Failure(state, error))  # then _fail, as any other request's ending

    def _forget(self, state: RequestState) -> None:
        self._queue.remove(state)
        if self._live.get(state.seq.request_id) is state:
            del self._live[state.seq.request_id]
            if not state.seq.is_finished:
                self._scheduler.finish(state.seq, "abort")
        if not self._live:
            self._idle.set()
