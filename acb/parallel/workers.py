"""Rank 0's side of tensor parallelism (:class:`TensorParallel`: start, mirror every forward, stop) and the worker
processes' loop (:func:`worker_main`), joined by a :class:`HeaderChannel`.

A worker is a ``spawn``-ed process (so, as with any ``multiprocessing`` program, a script that builds a
tensor-parallel engine must do it under ``if __name__ == "__main__":``). It receives its shard of the lean model
through shared memory, joins rank 0's process group, builds its KV cache and a :class:`~acb.step_inputs.StepInputs`
of the same geometry as rank 0's, captures the same decode CUDA graphs as rank 0 (at the same time: their
collectives meet), then loops: read a step's header from the channel (shared memory, host to host); stop, or
receive the staged input region, the step's block-table entries and the token buffer from the group (device to
device), and replay the same graph or run the same forward as rank 0 (its collectives meet rank 0's). A worker
never samples: rank 0 owns sampling and sends the sampled tokens with the next step's token buffer. A worker whose
rank 0 is gone notices while it waits for the next header, and exits.

A dead worker breaks the group's connections, so rank 0's next collective raises
:class:`~acb.errors.WorkerFailedError`; a monitor thread also notices the exit at once, records it, and terminates
the other workers. The engine then stops serving and fails its live requests with that reason.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
import weakref

import numpy as np
import torch

from ..attention import AttentionMetadata
from ..errors import WorkerFailedError
from ..families import LeanSpec
from ..kv_cache import KVCache, ModelShape
from .group import Group, host_store
from .shard import map_tensors

__all__ = ["TensorParallel", "Geometry", "worker_main"]

log = logging.getLogger("acb")

_HEADER = 10
_STOP, _STEP, _GRAPH, _WARM = 0, 1, 2, 3
_RENDEZVOUS_S = 120.0  # how long ranks wait for each other to join


@dataclasses.dataclass(frozen=True, slots=True)
class Geometry:
    """What a worker builds besides its model shard: the same geometry as rank 0's runner."""

    family: str
    vocab_size: int
    shape: ModelShape  # this rank's (KV heads divided)
    dtype: torch.dtype
    num_blocks: int  # including the scratch block
    block_size: int
    max_tokens: int
    max_rows: int
    max_blocks: int
    max_positions: int
    device_type: str
    device_index: int  # rank 0's GPU: rank r runs on the r-th after it
    graph_rows: int  # decode CUDA graphs up to this batch (0: none); captured in step with rank 0's
    threads: int
    checkpoint: str | None = None  # a directory each rank reads its own shard from (then no shard is sent)
    config: object = None  # the model's config, with a checkpoint


class HeaderChannel:
    """Step headers from rank 0 to the workers, host to host: a ring of slots in shared memory and a semaphore per
    worker. Rank 0 writes the next slot and releases every worker's semaphore when its host launches a step; a
    worker blocks on its semaphore (no spinning) and reads the slot. So a worker learns a step's sizes as soon as
    rank 0's host has them, and can queue the step's kernels behind the previous one: no device-to-host copy per
    step on the workers' critical path (the step's data itself travels device to device, in the group)."""

    SLOTS = 1024  # more than rank 0 can run ahead: overlap_depth (<= 8) steps of decode_steps (<= 64) sub-steps

    def __init__(self, ctx, workers: int) -> None:
        self._ring = ctx.RawArray("q", self.SLOTS * _HEADER)
        self._read = ctx.RawArray("q", workers)  # per worker: how many headers it has read
        self._ready = [ctx.Semaphore(0) for _ in range(workers)]
        self._seq = 0

    def _views(self) -> tuple[np.ndarray, np.ndarray]:
        ring = np.frombuffer(self._ring, dtype=np.int64).reshape(self.SLOTS, _HEADER)
        return ring, np.frombuffer(self._read, dtype=np.int64)

    def send(self, header: list[int], failed=lambda: None) -> None:
        ring, read = self._views()
        while self._seq - int(read.min()) >= self.SLOTS:  # never overwrite a slot a worker has not read
            if failed():
                raise WorkerFailedError(failed())
            time.sleep(1e-4)
        ring[self._seq % self.SLOTS] = header
        self._seq += 1
        for ready in self._ready:
            ready.release()

    def receive(self, worker: int) -> list[int]:
        """The next header, for worker ``worker`` (0 for rank 1); raises WorkerFailedError if rank 0 is gone."""
        while not self._ready[worker].acquire(timeout=1.0):
            parent = multiprocessing.parent_process()
            if parent is not None and not parent.is_alive():
                raise WorkerFailedError("rank 0 is gone")
        ring, read = self._views()
        header = ring[self._seq % self.SLOTS].tolist()
        self._seq += 1
        read[worker] = self._seq
        return header


class TensorParallel:
    def __init__(self, world: int, device: torch.device, timeout: float = 600.0) -> None:
        self.world, self.device, self.timeout = world, device, timeout
        self.procs: list[multiprocessing.Process] = []
        self.group: Group | None = None
        self.failed: str | None = None  # why the workers are gone, once one died
        self._stopping = False
        self.headers: HeaderChannel | None = None

    def start(self, shards: list[LeanSpec | None], geometry: Geometry) -> Group:
        """Start ranks 1.. with their shards (None: the rank reads its own from ``geometry.checkpoint``); returns
        rank 0's group once every rank joined."""
        store = host_store(self.world, _RENDEZVOUS_S)
        ctx = multiprocessing.get_context("spawn")
        self.headers = HeaderChannel(ctx, self.world - 1)
        for rank in range(1, self.world):
            shard = None if shards[rank] is None else _portable(shards[rank])
            proc = ctx.Process(target=worker_main, args=(rank, self.world, store.port, shard, geometry, self.headers,
                               self.timeout), name=f"acb-tp-rank{rank}", daemon=True)  # fmt: skip
            proc.start()
            self.procs.append(proc)
        weakref.finalize(self, _end, list(self.procs))  # an engine dropped without close() leaves no worker
        threading.Thread(target=_monitor, args=(weakref.ref(self), list(self.procs)), name="acb-tp-monitor",
                         daemon=True).start()  # fmt: skip
        # Joining the group waits for every rank; a worker that dies while starting must not leave us waiting.
        joined: list = []
        joiner = threading.Thread(target=lambda: joined.append(Group(store, 0, self.world, self.device, self.timeout)),
                                  name="acb-tp-join", daemon=True)  # fmt: skip
        joiner.start()
        while joiner.is_alive() and not self.failed:
            joiner.join(0.05)
        if not joined:
            self.stop(timeout=1.0)
            raise WorkerFailedError(self.failed or "the tensor-parallel workers did not join the process group")
        self.group = joined[0]
        self._store = store  # rank 0 hosts the store: it must outlive the group
        return self.group

    def mirror(self, b, j: int, splits: int, inputs, token_buf: torch.Tensor) -> None:
        """Send the workers what rank 0's next forward reads: sub-step ``j`` of step ``b`` (already staged, or
        advanced, on rank 0), with ``splits`` decode splits."""
        if self.failed:
            raise WorkerFailedError(self.failed)
        t, n, s = b.num_tokens, b.num_rows, len(b.sample_idx)
        _, end = inputs.compact(t, n, s)
        updates = len(b.table_slots) if j == 0 else 0
        self.headers.send([_STEP, t, n, s, int(b.decode_only), b.max_query_len, splits, end, updates, 0],
                          lambda: self.failed)  # fmt: skip
        self._send(inputs, end, updates, token_buf)

    def mirror_graph(self, b, j: int, bucket: int, inputs, token_buf: torch.Tensor) -> None:
        """Send the workers what rank 0's next decode-graph replay reads (sub-step ``j`` of step ``b``, the graph of
        ``bucket`` rows): a round's first replay reads the fixed staging region, every replay the token buffer; the
        later sub-steps advance the region on each rank's device, inside its own graph."""
        if self.failed:
            raise WorkerFailedError(self.failed)
        end = 0 if j else inputs.fixed_end
        updates = 0 if j else len(b.table_slots)
        self.headers.send([_GRAPH, bucket, int(j > 0), 0, 0, 0, 0, end, updates, 0], lambda: self.failed)
        self._send(inputs, end, updates, token_buf)

    def warm_gemms(self) -> None:
        """Ask the workers to run their shards' GEMMs at every row count an eager step can give them, as rank 0
        does (:meth:`acb.runner.ModelRunner.warm_gemms`); no collective runs."""
        if self.failed:
            raise WorkerFailedError(self.failed)
        self.headers.send([_WARM] + [0] * (_HEADER - 1), lambda: self.failed)

    def _send(self, inputs, end: int, updates: int, token_buf: torch.Tensor) -> None:
        g = self.group
        if end:
            g.broadcast(inputs.region(end))
        if updates:  # the entries stage() already put on the device
            g.broadcast(inputs.staged_updates(updates))
        g.broadcast(token_buf)

    def lost(self, exc: BaseException) -> WorkerFailedError:
        """A forward failed on rank 0 after its step reached the workers: they wait in a collective that will never
        complete. End them; the error to raise (the engine stops serving)."""
        if isinstance(exc, WorkerFailedError) and self.failed:
            return exc
        self.failed = self.failed or f"a tensor-parallel forward failed on rank 0 ({exc!r}); the workers were stopped"
        self._stopping = True
        _end(self.procs)
        return exc if isinstance(exc, WorkerFailedError) else WorkerFailedError(self.failed)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every worker to stop, wait for them (up to ``timeout`` s each), then end any that is left."""
        self._stopping = True
        if self.procs and not self.failed:
            try:
                self.headers.send([_STOP] + [0] * (_HEADER - 1), lambda: self.failed)
            except WorkerFailedError:
                pass
        for p in self.procs:
            p.join(timeout)
        _end(self.procs)  # any that did not stop in time
        if self.group is not None:
            self.group.close(self.failed is None)
        self.group = None

    def alive(self) -> list[int]:
        """Pids of worker processes still running."""
        return [p.pid for p in self.procs if p.is_alive()]


def _monitor(ref: weakref.ref, procs: list[multiprocessing.Process]) -> None:
    """Wait for any worker to exit; unless rank 0 is stopping them, record why and end the others. (Holds the
    :class:`TensorParallel` only weakly: an engine dropped without ``close()`` is still collected.)"""
    sentinels = {p.sentinel: p for p in procs}
    ended = multiprocessing.connection.wait(list(sentinels))
    tp = ref()
    if tp is None or tp._stopping:
        return
    dead = sentinels[ended[0]]
    dead.join(1.0)
    tp.failed = f"tensor-parallel worker {dead.name} (pid {dead.pid}) exited with code {dead.exitcode}"
    log.error("%s; stopping the other workers", tp.failed)
    for p in procs:
        if p.is_alive():
            p.terminate()
    if tp.group is not None:
        tp.group.abort()  # rank 0's collectives in flight would wait on the dead rank forever


def _end(procs: list[multiprocessing.Process]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


def worker_main(
    rank: int, world: int, port: int, shard: LeanSpec, geo: Geometry, headers: HeaderChannel, timeout: float
) -> None:
    from ..lean_model import EAGER_TOKEN_MULTIPLE, LeanCausalLM
    from ..runner import gemm_counts
    from ..step_inputs import StepInputs
    from .checkpoint import read_shard
    from .shard import materialize

    torch.set_num_threads(geo.threads)
    device = torch.device("cpu")
    if geo.device_type == "cuda":
        device = torch.device("cuda", geo.device_index + rank)
        torch.cuda.set_device(device)
    if geo.checkpoint is not None:
        shard = read_shard(geo.checkpoint, geo.config, geo.dtype, geo.family, rank, world, geo.max_positions)
    shard = materialize(shard, device, seed=rank)
    multiple = EAGER_TOKEN_MULTIPLE if device.type == "cuda" else 1  # as rank 0 pads eager steps (runner)
    group = Group.join(port, rank, world, device, timeout)
    lean = LeanCausalLM(None, geo.family, geo.max_positions, geo.max_rows, spec=shard, group=group,
                        vocab_size=geo.vocab_size)  # fmt: skip
    kv = lean.kv_cache = KVCache(geo.shape, geo.num_blocks, geo.block_size, geo.dtype, device)
    token_buf = torch.zeros(geo.max_rows + 1, dtype=torch.int64, device=device)
    inputs = StepInputs(max_tokens=geo.max_tokens, max_rows=geo.max_rows, graph_rows=geo.graph_rows,
                        num_slots=geo.max_rows, max_blocks=geo.max_blocks, block_size=geo.block_size,
                        scratch_block=geo.num_blocks - 1, token_buf=token_buf, device=device)  # fmt: skip
    try:
        with torch.inference_mode():
            graphs = None
            if geo.graph_rows:  # the same captures as rank 0's, in the same order: their collectives meet
                from ..cuda_graphs import DecodeGraphs

                def decode(d, splits: int) -> torch.Tensor:
                    return lean.forward(d.lean_inputs(max_query_len=1, decode_splits=splits, logits=False))

                graphs = DecodeGraphs(decode, inputs, geo.graph_rows, geo.max_positions,
                                      num_kv_heads=geo.shape.num_kv_heads, device=device, collectives=True)  # fmt: skip
                lean.row_buckets = graphs.buckets  # rank 0's: every rank pads a step's sampled rows alike
            while True:
                op, t, n, s, decode_only, max_query_len, splits, end, updates, _ = headers.receive(rank - 1)
                if op == _STOP:
                    if device.type == "cuda":  # NCCL's teardown can hang (see Group.close): the exit frees it all
                        torch.cuda.synchronize(device)
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(0)
                    return
                if op == _WARM:  # rank 0's counts: its row buckets are this rank's
                    if device.type == "cuda":
                        lean.warm_gemms(*gemm_counts(geo.max_tokens, multiple, geo.max_rows, lean.row_buckets))
                    continue
                if end:
                    group.broadcast(inputs.region(end))
                if updates:
                    inputs.apply_updates(group.broadcast(torch.empty(updates, 3, dtype=torch.int64, device=device)))
                group.broadcast(token_buf)
                if op == _GRAPH:  # t: the graph's rows, n: a round's later sub-step
                    graphs.replay(t, 0, advance=bool(n))
                    continue
                v, _ = inputs.compact(t, n, s)
                d = inputs.derive(v, t, n, s)
                meta = None
                if device.type != "cuda":  # the reference attention reads the layout on the host
                    meta = AttentionMetadata(kv_cache=kv, slot_mapping=d.slot_mapping,
                                             query_start_loc=v["query_start_loc"][: n + 1].tolist(),
                                             seq_lens=v["seq_lens"][:n].tolist(), block_tables=d.block_tables,
                                             decode_only=bool(decode_only))  # fmt: skip
                lean.forward(d.lean_inputs(max_query_len, splits, logits=True, meta=meta), multiple)
    except WorkerFailedError:
        return  # rank 0 is gone: nothing to serve


def _portable(spec: LeanSpec) -> LeanSpec:
    """``spec`` with its CUDA tensors copied to the host (CUDA tensors sent to a child stay pinned on the sender's
    GPU); host and ``meta`` tensors as they are."""
    return map_tensors(spec, lambda _, x: x.cpu() if x.device.type == "cuda" else x)
