"""GPU launch: run one prepared step through the model and sample, without blocking the event loop.

Steps execute in launch order on one worker thread (the CPU's equivalent of a CUDA stream): while step N computes
there, the event loop schedules and prepares step N+1. On CUDA the worker only enqueues kernels and a completion
event; :mod:`acb.bridge` awaits that event from the loop.

Overlap hinges on the device-side token buffer: each step writes every sampled token to ``token_buf[slot]``, and
the next step gathers its decode inputs from there, so step N+1 can be launched before step N's tokens reach the
host. A multi-step decode round runs its sub-steps back to back in one launch, each fed from the buffer.

Every path stages its inputs the same way (:mod:`acb.step_inputs`). Two model paths:

- **lean** (:mod:`acb.lean_model`, the families of :mod:`acb.families`): fused kernels;
- **generic** (:mod:`acb.generic_model`): any transformers causal LM, through its own modules and acb's attention.

On CUDA, decode steps of either path replay a CUDA graph (:mod:`acb.cuda_graphs`) and other steps run eagerly.
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

from . import cuda_graphs
from .attention import AttentionMetadata
from .batch import StepBatch
from .errors import WorkerFailedError
from .generic_model import GenericCausalLM
from .grammar import GrammarMasks
from .kernels import decode_splits
from .kv_cache import KVCache
from .lean_model import EAGER_TOKEN_MULTIPLE, LeanCausalLM, padded_tokens
from .logits import LogitsState
from .sampling import SamplingTensors, Top, sample
from .step_inputs import StepInputs
from .tracing import StepTimer

__all__ = ["StepResult", "StepHandle", "ModelRunner"]


@dataclass(slots=True)
class StepResult:
    """What a step leaves for the host: sampled tokens (valid once ``event`` completed, if any). Row ``j`` holds
    sub-step ``j``'s samples (one row unless the step is a multi-step round), in the order of that sub-step's
    sampling rows."""

    tokens: torch.Tensor  # [steps, S] int64 on the host
    logprobs: torch.Tensor | None  # [steps, S] float32 on the host
    event: torch.cuda.Event | None
    top: Top | None = None  # ([steps, S, k] ids, [steps, S, k] log-probabilities) on the host, when asked


@dataclass(slots=True)
class StepHandle:
    batch: StepBatch
    future: concurrent.futures.Future[StepResult]


# CUDA graphs of engines whose steps could not settle (a hung step, a dead tensor-parallel peer): never destroyed,
# since destroying them waits for a device that may never finish; the process's exit frees them.
_ABANDONED: list = []


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
        self._thread.join(None if timeout is None or timeout >= threading.TIMEOUT_MAX else timeout)
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


def gemm_counts(max_tokens: int, multiple: int, max_rows: int, row_buckets: list[int] | None):
    """The row counts an eager step of the lean path gives its layers' GEMMs (every :func:`padded_tokens` count up to
    ``max_tokens``'s; every count when ``multiple`` is 1), and the counts its LM head and last layer meet (the decode
    graphs' buckets, or any count of sampled rows without graphs)."""
    counts = sorted(
        {padded_tokens(t, multiple) for t in range(1, max_tokens + 1, multiple)} | {padded_tokens(max_tokens, multiple)}
    )
    heads = list(row_buckets) if row_buckets else list(range(1, max_rows + 1))
    return sorted(set(counts) | set(heads)), heads


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        device: torch.device,
        *,
        max_num_seqs: int,
        max_tokens: int,
        max_blocks: int,
        block_size: int,
        max_model_len: int,
        lean: LeanCausalLM | None = None,
        graphs: bool = False,
        mixed_graphs: bool = False,
        record_timing: bool = False,
        tp=None,
    ) -> None:
        """``graphs`` (CUDA) turns on decode CUDA graphs. Padding rows (graphs, a round's finished rows) use a scratch
        block, the KV cache's last one, which no sequence owns. ``tp``: the :class:`~acb.parallel.TensorParallel`
        whose workers mirror every forward of ``lean`` (this process is rank 0)."""
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.lean = lean
        self.tp = tp
        self.generic = GenericCausalLM(model, kv_cache, device) if lean is None else None
        # why the decode steps of a model on the generic path cannot be captured (they run eagerly then), or None
        self.graph_blocker = self.generic.graph_blocker() if graphs and self.generic is not None else None
        graphs = graphs and self.graph_blocker is None
        # one entry per sequence slot, plus a spare that padding rows of decode graphs write to
        self.token_buf = torch.zeros(max_num_seqs + 1, dtype=torch.int64, device=device)
        graph_rows = cuda_graphs.graph_rows(max_num_seqs) if graphs else 0
        self.inputs = StepInputs(
            max_tokens=max(max_tokens, max_num_seqs),
            max_rows=max_num_seqs,
            graph_rows=graph_rows,
            num_slots=max_num_seqs,
            max_blocks=max_blocks,
            block_size=block_size,
            scratch_block=kv_cache.num_blocks - 1,
            token_buf=self.token_buf,
            device=device,
        )
        # what requests ask of the logits besides sampling: penalties and biases (per-slot device history), grammars
        vocab = model.get_output_embeddings().weight.shape[0]
        self.logits_state = LogitsState(max_num_seqs, vocab, device)
        self.grammar_masks = GrammarMasks(max_num_seqs, device)
        self._cuda = device.type == "cuda"
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if self._cuda else 0
        self._num_kv_heads = kv_cache.layers[0].shape[3]
        self.graphs = None
        if graphs:
            DecodeGraphs = cuda_graphs.DecodeGraphs
            if lean is not None:
                try:  # under tensor parallelism the workers capture the same graphs at the same time
                    self.graphs = DecodeGraphs(self._lean_decode, self.inputs, graph_rows, max_model_len,
                                               num_kv_heads=self._num_kv_heads, device=device,
                                               collectives=tp is not None)  # fmt: skip
                except BaseException as exc:
                    if tp is None:
                        raise
                    raise tp.lost(exc) from exc
            else:
                try:  # transformers' modules may do what a capture forbids (read a tensor on the host)
                    self.graphs = DecodeGraphs(self._generic_decode, self.inputs, graph_rows, max_model_len,
                                               num_kv_heads=self._num_kv_heads, device=device,
                                               capturing=self.generic.capturable)  # fmt: skip
                except RuntimeError as exc:
                    torch.cuda.synchronize(device)
                    self.graph_blocker = f"capturing its decode step failed ({exc})"
        # the row counts the capture ran every GEMM at: steps with prompts pad their sampled rows to one of them
        for m in (lean, self.generic):  # (the lean model outlives the engine: this engine's buckets, or none)
            if m is not None:
                m.row_buckets = self.graphs.buckets if self.graphs is not None else None
        # piecewise graphs for the steps that start prompts (lean path, one process; eager pieces on the CPU)
        self.mixed = None
        if mixed_graphs and lean is not None and tp is None:
            from .mixed_graphs import MixedGraphs

            self.mixed = MixedGraphs(lean, max(max_tokens, max_num_seqs), max_num_seqs, device)
        # the lean path's eager steps pad their tokens to a multiple of this (LeanCausalLM.forward; workers alike)
        self.token_multiple = EAGER_TOKEN_MULTIPLE if self._cuda else 1
        self._max_tokens, self._max_rows = max(max_tokens, max_num_seqs), max_num_seqs
        self.closed = False
        self._worker = StepWorker("acb-step")
        self._staged: dict[str, torch.Tensor] | None = None  # device views of the step being run (worker only)
        self.timer = StepTimer(device, record_timing)  # step timing and the device's trace spans

    def launch(self, batch: StepBatch) -> StepHandle:
        """Queue ``batch`` for execution after every step launched before it; returns at once."""
        return StepHandle(batch, self._worker.submit(self._execute, batch))

    def warm_gemms(self) -> concurrent.futures.Future:
        """Queue the lean model's GEMMs at every row count an eager step can give them (on every rank): see
        :meth:`LeanCausalLM.warm_gemms`. Returns the future of the number of row counts (0: nothing to warm)."""
        return self._worker.submit(self._warm_gemms)

    def _warm_gemms(self) -> int:
        # cuBLAS's kernel loads are what this is for; the generic path's modules run at the step's own token count
        if self.lean is None or not self._cuda:
            return 0
        counts, heads = gemm_counts(self._max_tokens, self.token_multiple, self._max_rows, self.lean.row_buckets)
        if self.tp is not None:
            self._mirrored(lambda: self.tp.warm_gemms(), lambda: None)
        self.lean.warm_gemms(counts, heads)
        torch.cuda.synchronize(self.device)
        return len(counts)

    def close(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` seconds) for queued steps, stop the worker, and let go of the KV cache and the
        CUDA graphs (blocking: call it from a thread). Returns False if a step was still running at the timeout.

        The lean model outlives the engine (it is kept on the model for the next one): without this, its reference
        would keep this engine's cache allocated, and the next engine on the same model would size its own cache
        from what is left."""
        finished = self._worker.shutdown(timeout)
        # A tensor-parallel peer that died may have left this GPU's stream inside a collective forever: destroying
        # graphs (or anything else that waits for the device) could then block, so they are left to the process's
        # exit.
        settled = finished and (self.tp is None or not self.tp.failed)
        if self.graphs is not None and settled:  # before the process group: graphs hold its captured collectives
            self.graphs.release()
        if self.mixed is not None and settled:
            self.mixed.release()
        if not settled:  # kept referenced: a graph's destructor waits for the device too
            _ABANDONED.extend(g for g in (self.graphs, self.mixed) if g is not None)
        self.graphs = self.mixed = None
        if self.tp is not None:
            self.tp.stop()
        self.closed = True
        if self.lean is not None and self.lean.kv_cache is self.kv_cache:
            self.lean.kv_cache = None
        self.kv_cache = None
        if self.generic is not None:
            self.generic.release()
        self.generic = None
        return finished

    def _execute(self, b: StepBatch) -> StepResult:
        spans = self.timer.cpu_spans
        if spans is None:
            return self._execute_step(b)
        t0 = time.perf_counter()
        try:
            return self._execute_step(b)
        finally:
            spans.append((t0, time.perf_counter()))

    @torch.inference_mode()
    def _execute_step(self, b: StepBatch) -> StepResult:
        steps = b.num_steps
        if b.setups:
            self.logits_state.setup(b.setups)
        if steps == 1:
            tokens, logprobs, top = self._sub_step(b, 0)
            if top is not None:
                top = (top[0][None], top[1][None])
            return self._finish(tokens[None], None if logprobs is None else logprobs[None], top)
        # A round: every sub-step's GPU work is queued now, each advanced from the last on the device.
        n = b.num_rows
        out = torch.empty(steps, n, dtype=torch.int64, device=self.device)
        out_lp = torch.empty(steps, n, dtype=torch.float32, device=self.device) if b.needs_logprobs else None
        k = b.top_logprobs
        out_top = None
        if k:
            out_top = (torch.empty(steps, n, k, dtype=torch.int64, device=self.device),
                       torch.empty(steps, n, k, dtype=torch.float32, device=self.device))  # fmt: skip
        for j in range(steps):
            tokens, logprobs, top = self._sub_step(b, j)
            out[j] = tokens  # rows keep their place; a finished row's entries are never read
            if out_lp is not None:
                out_lp[j] = logprobs
            if out_top is not None:
                out_top[0][j], out_top[1][j] = top
        return self._finish(out, out_lp, out_top)

    def _sub_step(self, b: StepBatch, j: int) -> tuple[torch.Tensor, torch.Tensor | None, Top | None]:
        """Run one step (or sub-step ``j`` of a round): stage (or advance), forward, sample, store the samples in the
        token buffer. Returns the samples (-1 where the logits were not finite), their logprobs and the top
        alternatives (when asked)."""
        start = self.timer.begin()
        n, s = b.num_rows, len(b.sample_idx)
        graphs = self.graphs
        graphed = graphs is not None and b.decode_only and s == n and n <= graphs.max_batch
        if graphed:
            bucket = graphs.bucket(n)
            if j == 0:
                v = self._staged = self.inputs.stage(b, graph_rows=bucket, start=start)
            else:
                v = self._staged
                if start is not None:
                    start.record()
            if self.tp is None:
                logits, greedy = graphs.replay(bucket, n, advance=j > 0)
            else:  # every rank replays its own graph of this bucket; their collectives meet inside
                logits, greedy = self._mirrored(lambda: self.tp.mirror_graph(b, j, bucket, self.inputs, self.token_buf),
                                                lambda: graphs.replay(bucket, n, advance=j > 0))  # fmt: skip
            if b.plain:  # sampled and stored inside the graph
                self.timer.end(start, (n, b.num_tokens, graphed))
                return greedy, None, None
        else:
            if j == 0:
                v = self._staged = self.inputs.stage(b, start=start)
            else:
                v = self._staged
                if start is not None:
                    start.record()
                self.inputs.advance(v, n)
            logits = self._forward(b, self.inputs.derive(v, b.num_tokens, n, s), j)
        greedy = b.all_greedy
        params = SamplingTensors(
            temperature=None if greedy else v["temperature"][:s],
            top_k=None if greedy else v["top_k"][:s],
            top_p=None if greedy else v["top_p"][:s],
            seeds=None if greedy else v["seeds"][:s],
            positions=None if greedy else v["sample_positions"][:s],
            all_greedy=greedy,
            needs_filter=b.needs_filter,
            needs_logprobs=b.needs_logprobs,
        )
        raw = None
        if b.processing is not None or b.grammar_rows:  # only these rows change; the graph ran as usual
            raw, logits = logits, (logits.clone() if logits.dtype == torch.float32 else logits.float())
            if b.processing is not None:
                self.logits_state.apply(logits, b.processing)
            if b.grammar_rows:
                self.grammar_masks.apply(logits, b.grammar_rows)  # waits for the last step's tokens
        tokens, logprobs, top = sample(logits, params, raw=raw, top_logprobs=b.top_logprobs)
        self.token_buf[v["sample_slots"][:s]] = tokens.clamp_min(0)  # a flagged row (-1) must not reach the model
        if b.processing is not None:
            self.logits_state.record(tokens, b.processing)
        if b.grammar_rows:
            self.grammar_masks.record(tokens, b.grammar_rows)
        self.timer.end(start, (n, b.num_tokens, graphed))
        return tokens, logprobs, top

    def _forward(self, b: StepBatch, d, j: int = 0) -> torch.Tensor:
        """Logits of the sampled rows of an eagerly run step (sub-step ``j`` of a round)."""
        seq_lens = b.seq_lens if j == 0 else np.where(b.counts > j, b.seq_lens + j, 1)
        splits = 0
        if self._cuda and b.decode_only:
            splits = decode_splits(b.num_rows, self._num_kv_heads, int(seq_lens.max()), self._num_sms)
        host_layout = None
        if self.lean is None or not self._cuda:  # the reference attention reads the layout on the host
            host_layout = (b.query_start_loc.tolist(), seq_lens.tolist())
        if self.lean is None:
            return self.generic.forward(d, decode_only=b.decode_only, max_query_len=b.max_query_len,
                                        decode_splits=splits, host_layout=host_layout,
                                        logits_rows=d.sample_idx)  # fmt: skip
        meta = None
        if host_layout is not None:
            meta = AttentionMetadata(
                kv_cache=self.kv_cache,
                slot_mapping=d.slot_mapping,
                query_start_loc=host_layout[0],
                seq_lens=host_layout[1],
                block_tables=d.block_tables,
                decode_only=b.decode_only,
            )
        x = d.lean_inputs(b.max_query_len, splits, logits=True, meta=meta)
        if self.tp is None:
            s = len(b.sample_idx)
            if self.mixed is not None and not splits and self.mixed.fits(b.num_tokens, s):
                return self.mixed.forward(x, b.num_tokens, s)
            return self.lean.forward(x, self.token_multiple)
        return self._mirrored(lambda: self.tp.mirror(b, j, splits, self.inputs, self.token_buf),
                              lambda: self.lean.forward(x, self.token_multiple))  # fmt: skip

    def _mirrored(self, send: Callable[[], None], run: Callable):
        """Tensor parallelism: ``send`` the workers this forward, then ``run`` it here; the collectives meet inside.
        A forward that fails half way leaves them inside a collective that rank 0 will never join: the group is
        lost with it (the error raised is a WorkerFailedError)."""
        try:
            send()
            return run()
        except BaseException as exc:
            error = self.tp.lost(exc)
            if error is exc:
                raise
            raise error from exc

    def check_workers(self) -> None:
        """Raise WorkerFailedError if a tensor-parallel worker died: the last steps' collectives were aborted, so
        their results must not reach anyone."""
        if self.tp is not None and self.tp.failed:
            raise WorkerFailedError(self.tp.failed)

    def _lean_decode(self, d, splits: int) -> torch.Tensor:
        """A decode step through the lean model, every row's logits (what the graphs capture)."""
        return self.lean.forward(d.lean_inputs(max_query_len=1, decode_splits=splits, logits=False))

    def _generic_decode(self, d, splits: int) -> torch.Tensor:
        """A decode step through the generic path, every row's logits (what the graphs capture)."""
        return self.generic.forward(d, decode_only=True, max_query_len=1, decode_splits=splits)

    def _finish(self, tokens: torch.Tensor, logprobs: torch.Tensor | None, top: Top | None) -> StepResult:
        """Start the copy of a step's samples to the host, and mark the step's end with an event after it."""
        event = None
        if self._cuda:
            tokens = tokens.to("cpu", non_blocking=True)
            logprobs = None if logprobs is None else logprobs.to("cpu", non_blocking=True)
            if top is not None:
                top = (top[0].to("cpu", non_blocking=True), top[1].to("cpu", non_blocking=True))
            event = torch.cuda.Event()
            event.record()  # after the copies: the host may read them once this completed
        return StepResult(tokens, logprobs, event, top)
