"""GPU launch: run one prepared step through the model and sample, without blocking the event loop.

Steps execute in launch order on one worker thread (the CPU's equivalent of a CUDA stream): while step N computes
there, the event loop schedules and prepares step N+1. On CUDA the worker only enqueues kernels and a completion
event; :mod:`acb.bridge` awaits that event from the loop.

Overlap hinges on the device-side token buffer: each step writes every sampled token to ``token_buf[slot]``, and
the next step gathers its decode inputs from there, so step N+1 can be launched before step N's tokens reach the
host.

Two model paths:

- **lean** (:mod:`acb.lean_model`, Llama/Qwen families): fused kernels; on CUDA, decode steps replay a CUDA graph
  (:mod:`acb.cuda_graphs`) and other steps run eagerly;
- **generic**: any transformers causal LM, through its own modules and acb's attention function.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionMetadata
from .batch import StepBatch
from .kernels import decode_splits
from .kv_cache import KVCache
from .lean_model import LeanCausalLM, LeanInputs
from .sampling import SamplingTensors, sample

__all__ = ["StepResult", "StepHandle", "ModelRunner"]


@dataclass(slots=True)
class StepResult:
    """What a step leaves for the host: sampled tokens (valid once ``event`` completed, if any)."""

    tokens: torch.Tensor  # [S] int64 on the host
    logprobs: torch.Tensor | None  # [S] float32 on the host
    event: torch.cuda.Event | None


@dataclass(slots=True)
class StepHandle:
    batch: StepBatch
    future: concurrent.futures.Future[StepResult]


class StepWorker:
    """One thread that runs submitted calls in submission order: the CPU's equivalent of a CUDA stream.

    A daemon thread, started on first use: a step that never returns (a hung kernel, a deadlocked model) cannot keep
    the process from exiting once :meth:`shutdown` gave up waiting for it.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None:
            self._thread = threading.Thread(target=_work, args=(self._queue,), name=self._name, daemon=True)
            self._thread.start()
            weakref.finalize(self, self._queue.put, None)  # a worker dropped without shutdown() still ends
        self._queue.put((future, fn, args))
        return future

    def shutdown(self, timeout: float | None) -> bool:
        """Let queued calls finish, then stop; True if the thread ended within ``timeout`` seconds."""
        self._queue.put(None)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _work(calls: queue.SimpleQueue) -> None:
    while (item := calls.get()) is not None:
        future, fn, args = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
        del item, future, fn, args  # hold nothing of a finished step while waiting for the next


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        max_num_seqs: int,
        device: torch.device,
        *,
        lean: LeanCausalLM | None = None,
        graph_geometry: dict | None = None,
        record_timing: bool = False,
    ) -> None:
        """``graph_geometry`` (CUDA + lean only) turns on decode CUDA graphs: ``max_batch``, ``max_blocks``,
        ``scratch_block``, ``block_size``, ``max_model_len``."""
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.lean = lean
        # one entry per sequence slot, plus a spare that decode graphs write unwanted samples to
        self.token_buf = torch.zeros(max_num_seqs + 1, dtype=torch.int64, device=device)
        self.graphs = None
        if graph_geometry is not None:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(lean, self.token_buf, **graph_geometry)
        self._cuda = device.type == "cuda"
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if self._cuda else 0
        self.closed = False
        self._worker = StepWorker("acb-step")
        # (start, end) CUDA events of every step's GPU work, for the idle-fraction measurement of the benchmarks
        self.step_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = [] if record_timing else None
        self._trace_from: int | None = None  # index into step_events (CUDA) where a trace started
        self._trace_ref: tuple[torch.cuda.Event, float] | None = None
        self._cpu_spans: list[tuple[float, float]] | None = None  # worker compute spans (CPU) while tracing

    def launch(self, batch: StepBatch) -> StepHandle:
        """Queue ``batch`` for execution after every step launched before it; returns at once."""
        return StepHandle(batch, self._worker.submit(self._execute, batch))

    def close(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` seconds) for queued steps, stop the worker, and let go of the KV cache and the
        CUDA graphs (blocking: call it from a thread). Returns False if a step was still running at the timeout.

        The lean model outlives the engine (it is kept on the model for the next one): without this, its reference
        would keep this engine's cache allocated, and the next engine on the same model would size its own cache
        from what is left."""
        finished = self._worker.shutdown(timeout)
        self.closed = True
        if self.lean is not None and self.lean.kv_cache is self.kv_cache:
            self.lean.kv_cache = None
        self.graphs = None
        self.kv_cache = None
        return finished

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self._cuda:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def start_device_trace(self) -> None:
        if self._cuda:
            if self.step_events is None:
                raise RuntimeError("tracing on CUDA needs EngineConfig(record_step_timing=True)")
            torch.cuda.synchronize(self.device)
            ref = torch.cuda.Event(enable_timing=True)
            ref.record()
            ref.synchronize()
            self._trace_ref = (ref, time.perf_counter())  # the GPU was idle: ref ran at about this host time
            self._trace_from = len(self.step_events)
        else:
            self._cpu_spans = []

    def stop_device_trace(self) -> list[tuple[float, float]]:
        if not self._cuda:
            spans, self._cpu_spans = self._cpu_spans or [], None
            return spans
        if self._trace_ref is None:
            return []
        ref, t_ref = self._trace_ref
        out = []
        for start, end in self.step_events[self._trace_from :]:
            end.synchronize()
            out.append((t_ref + ref.elapsed_time(start) / 1e3, t_ref + ref.elapsed_time(end) / 1e3))
        self._trace_ref = None
        return out

    def _execute(self, b: StepBatch) -> StepResult:
        if self._cpu_spans is None:
            return self._execute_step(b)
        t0 = time.perf_counter()
        try:
            return self._execute_step(b)
        finally:
            self._cpu_spans.append((t0, time.perf_counter()))

    @torch.inference_mode()
    def _execute_step(self, b: StepBatch) -> StepResult:
        start = None
        if self.step_events is not None:
            start = torch.cuda.Event(enable_timing=True)
        if self.graphs is not None and b.decode_only and len(b.seq_lens) <= self.graphs.max_batch:
            every_row = len(b.sample_idx) == len(b.seq_lens)
            if every_row and b.all_greedy and not b.needs_logprobs:  # sampled and stored inside the graph
                _, tokens = self.graphs.run(b, start, greedy=True)
                return self._finish(tokens, None, start)
            logits, _ = self.graphs.run(b, start)
            if not every_row:
                logits = logits[self._to_device(b.sample_idx)]
        else:
            if start is not None:  # eager steps: gaps between their kernels count as busy (a lower bound of idle)
                start.record()
            logits = self.lean.forward(self._lean_inputs(b)) if self.lean is not None else self._generic_logits(b)
        dev = self._to_device
        # An all-greedy step reads none of the per-row parameters: skip their five host-to-device copies.
        greedy = b.all_greedy
        params = SamplingTensors(
            temperature=None if greedy else dev(b.temperature),
            top_k=None if greedy else dev(b.top_k),
            top_p=None if greedy else dev(b.top_p),
            seeds=None if greedy else dev(b.seeds),
            positions=None if greedy else dev(b.sample_positions),
            all_greedy=greedy,
            needs_filter=b.needs_filter,
            needs_logprobs=b.needs_logprobs,
        )
        tokens, logprobs = sample(logits, params)
        self.token_buf[dev(b.sample_slots)] = tokens.clamp_min(0)  # a flagged row (-1) must not reach the model
        return self._finish(tokens, logprobs, start)

    def _finish(
        self, tokens: torch.Tensor, logprobs: torch.Tensor | None, start: torch.cuda.Event | None
    ) -> StepResult:
        """Start the copy of a step's samples to the host and mark the step's end with an event."""
        event = None
        if self._cuda:
            tokens = tokens.to("cpu", non_blocking=True)
            logprobs = None if logprobs is None else logprobs.to("cpu", non_blocking=True)
            event = torch.cuda.Event(enable_timing=start is not None)
            event.record()
            if start is not None:
                self.step_events.append((start, event))
        return StepResult(tokens, logprobs, event)

    def _input_ids(self, b: StepBatch) -> torch.Tensor:
        input_ids = self._to_device(b.input_ids)
        if len(b.device_idx):
            input_ids[self._to_device(b.device_idx)] = self.token_buf[self._to_device(b.device_slots)]
        return input_ids

    def _meta(self, b: StepBatch) -> AttentionMetadata:
        return AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=self._to_device(b.slot_mapping),
            query_start_loc=b.query_start_loc.tolist(),
            seq_lens=b.seq_lens.tolist(),
            block_tables=self._to_device(b.block_tables),
            decode_only=b.decode_only,
        )

    def _lean_inputs(self, b: StepBatch) -> LeanInputs:
        meta = self._meta(b)
        splits = 0
        if self._cuda and b.decode_only:
            splits = decode_splits(len(b.seq_lens), self.lean.num_kv_heads, int(b.seq_lens.max()), self._num_sms)
        return LeanInputs(
            input_ids=self._input_ids(b),
            positions=self._to_device(b.positions),
            slot_mapping=meta.slot_mapping,
            seq_lens=self._to_device(b.seq_lens),
            block_tables=meta.block_tables,
            query_start_loc=self._to_device(b.query_start_loc),
            max_query_len=int((b.query_start_loc[1:] - b.query_start_loc[:-1]).max()),
            logits_idx=self._to_device(b.sample_idx),
            decode_splits=splits,
            meta=None if self._cuda else meta,
        )

    def _generic_logits(self, b: StepBatch) -> torch.Tensor:
        out = self.model(
            input_ids=self._input_ids(b)[None],
            position_ids=self._to_device(b.positions)[None],
            use_cache=False,
            logits_to_keep=self._to_device(b.sample_idx),
            acb_meta=self._meta(b),
        )
        return out.logits[0]
