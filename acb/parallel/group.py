"""The collectives a tensor-parallel forward needs, over one process group of its own.

acb does not touch ``torch.distributed``'s default group (the user's process may use one for something else): each
engine makes a private group from a ``TCPStore`` that rank 0 hosts. Gloo on the CPU, NCCL on CUDA, where the
small all-reduces and the logits' gather of decode steps take one-shot kernels over peer-mapped buffers instead
(:mod:`acb.parallel.allreduce`; ``ACB_ALLREDUCE=nccl`` in the environment turns them off, ``=pull`` picks the
sums' other variant, for comparisons). Collectives captured in CUDA graphs use a communicator of their own.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading

import torch
import torch.distributed as dist

from ..errors import WorkerFailedError
from .allreduce import setup_one_shot

__all__ = ["Group", "host_store"]

log = logging.getLogger("acb")

CLOSE_WAIT_S = 10.0
"""How long closing waits for the NCCL communicators to abort."""

ONE_SHOT_MAX_BYTES = 2 << 20
"""Sums up to this size take the one-shot all-reduce (a decode step's: rows x hidden x 2 bytes); larger ones NCCL."""

ONE_SHOT_GATHER_BYTES = 8 << 20
"""Gathers of up to this much per rank take the one-shot kernel too (the logits of a decode step: rows x vocabulary /
ranks x 2 bytes; 4 MB for 32 rows of Llama 3's vocabulary at TP=2); larger ones NCCL. The peer-mapped buffer holds
two regions of one such part per rank: 32 MB per GPU at TP=2. ``ACB_ONE_SHOT_GATHER_MB`` in the environment sets it
(0: NCCL does every gather)."""


def host_store(world: int, timeout: float) -> dist.TCPStore:
    """Rank 0's store, on a free local port (``store.port``)."""
    return dist.TCPStore("127.0.0.1", 0, world, True, timeout=datetime.timedelta(seconds=timeout),
                         wait_for_workers=False)  # fmt: skip


class Group:
    def __init__(self, store: dist.Store, rank: int, world: int, device: torch.device, timeout: float) -> None:
        self.rank, self.world, self.device = rank, world, device
        delta = datetime.timedelta(seconds=timeout)
        self.one_shot = None  # the peer-mapped all-reduce for small sums (CUDA), or None: NCCL does them all
        self._graph_pg = None
        self.store = store
        if device.type == "cuda":
            # NCCL connects each algorithm's channels at its first use unless told otherwise; a first use inside a
            # graph capture would do it there
            os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = delta
            self._pg = dist.ProcessGroupNCCL(dist.PrefixStore("eager/", store), rank, world, opts)
            # A second communicator for the collectives captured in CUDA graphs: one communicator used both inside
            # captures and eagerly can deadlock the ranks at capture (SGLang and vLLM keep them apart too).
            self._graph_pg = dist.ProcessGroupNCCL(dist.PrefixStore("graph/", store), rank, world, opts)
            for pg in (self._pg, self._graph_pg):  # create both communicators now, outside any capture
                pg.allreduce([torch.zeros(1, device=device)]).wait()
            torch.cuda.synchronize(device)
            mode = os.environ.get("ACB_ALLREDUCE", "push")
            if mode != "nccl":
                gather = int(float(os.environ.get("ACB_ONE_SHOT_GATHER_MB", ONE_SHOT_GATHER_BYTES / 2**20)) * 2**20)
                self.one_shot = setup_one_shot(store, rank, world, device, ONE_SHOT_MAX_BYTES, mode,
                                               gather_bytes=gather)  # fmt: skip
        else:
            self._pg = dist.ProcessGroupGloo(store, rank, world, delta)

    @classmethod
    def join(cls, port: int, rank: int, world: int, device: torch.device, timeout: float) -> Group:
        """A worker's side: connect to rank 0's store."""
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=timeout))
        return cls(store, rank, world, device, timeout)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        if self.one_shot is not None and self.one_shot.fits(t):
            return self.one_shot(t)
        self._wait(self._now().allreduce([t]))
        return t

    def all_reduce_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> torch.Tensor | None:  # fmt: skip
        """The one-shot kernel's sum of ``x`` fused with the residual add and RMSNorm after it (see
        :meth:`~acb.parallel.allreduce.OneShot.add_rmsnorm`), or None when it does not take these tensors: the
        caller then sums and normalizes in two steps."""
        one = self.one_shot
        if one is None or not one.fits_norm(x, residual):
            return None
        return one.add_rmsnorm(x, residual, weight, eps)

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` side by side along the last dimension (rank order)."""
        t = t.contiguous()
        if self.one_shot is not None and self.one_shot.fits_gather(t):
            return self.one_shot.gather_last(t)
        if self.device.type == "cuda":  # into one tensor: the form NCCL captures in graphs without extra copies
            out = torch.empty((self.world, *t.shape), dtype=t.dtype, device=t.device)
            self._wait(self._now()._allgather_base(out, t))
            return out.movedim(0, -2).reshape(*t.shape[:-1], -1)
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(self._pg.allgather([parts], [t]))
        return torch.cat(parts, dim=-1)

    def _now(self):
        """The NCCL communicator for a collective issued now: the graphs' own while a CUDA graph is being captured."""
        if self._graph_pg is not None and torch.cuda.is_current_stream_capturing():
            return self._graph_pg
        return self._pg

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` into every rank's ``t`` (in place)."""
        self._wait(self._pg.broadcast(t, 0))
        return t

    def abort(self) -> None:
        """End the group's collectives in flight (NCCL): a rank that died leaves the others' collectives waiting on
        the GPU forever, and with them every later step. Called once a worker is known dead; gloo raises by itself."""
        if self.device.type != "cuda":
            return
        if self.one_shot is not None:
            self.one_shot.abort()
        for pg in (self._pg, self._graph_pg):
            try:
                pg.abort()
            except Exception:  # best effort: the engine is failing already
                log.exception("aborting the tensor-parallel process group failed")

    def close(self, settled: bool) -> None:
        """Let go of the group. NCCL: wait for this rank's GPU work (when ``settled``: no peer died mid-collective),
        then abort the communicators (destroying them waits on peers that may be gone) in a thread of their own,
        given :data:`CLOSE_WAIT_S`: on four H200s, ``ProcessGroupNCCL.abort()`` after a run with collectives
        captured in CUDA graphs did not return (docs/parallel.md), and closing an engine must not hang on it."""
        if self.device.type == "cuda":
            if settled:
                torch.cuda.synchronize(self.device)
            ender = threading.Thread(target=self.abort, name="acb-tp-abort", daemon=True)
            ender.start()
            ender.join(CLOSE_WAIT_S)
            if ender.is_alive():
                log.warning("the tensor-parallel NCCL communicators did not abort within %.0f s; left to the "
                            "process's exit", CLOSE_WAIT_S)  # fmt: skip

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as exc:  # a peer process died (connection reset) or timed out
            raise WorkerFailedError(f"a tensor-parallel collective failed on rank {self.rank}: {exc}") from exc
