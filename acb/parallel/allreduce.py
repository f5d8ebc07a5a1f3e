"""A one-shot all-reduce for the small sums of a decode step, between the GPUs of one host.

NCCL takes 15-40 µs per all-reduce however small the tensor (measured on an H200 pair, docs/gpu.md), and a
tensor-parallel decode step makes two per layer: 160 calls for an 80-layer model. Here each rank owns one buffer in
its GPU memory, mapped into every other rank (CUDA IPC), and a call is one Triton kernel (``push``, the default):

1. each program writes its chunks of the input into every rank's buffer, in this rank's part of the call's region
   (stores to a peer are posted over NVLink: the writer does not wait for them);
2. it signals every peer (writes its epoch into the peer's flag for this program and this rank, a release at
   system scope) and waits until every peer's flag for it reached the epoch (acquire);
3. it sums its chunks over the parts of its own buffer, in rank order and in float32, so that every rank gets the
   same bits.

The ``pull`` variant writes only its own buffer and reads every peer's in step 3 (each read waits a round trip over
NVLink: 2-3x slower on four H200s, docs/parallel.md).

Epochs come from a counter per program on the device, so the kernel is captured in CUDA graphs and replayed as is
(every rank runs the same sequence of calls). Two regions make one barrier per call enough: a rank writes a region
again two calls later, after a barrier that every peer reached only once it had finished reading that region.

A peer that died never signals: once the engine's monitor saw the worker exit, it sets an abort word in pinned host
memory that the waits read now and then, so they end (the sums are garbage, and the engine has failed); without it
a wait gives up after minutes of polling rather than spin forever. Tensors larger
than :attr:`OneShot.max_bytes` go to NCCL, whose ring is the better algorithm there.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle

import torch

__all__ = ["OneShot", "setup_one_shot"]

log = logging.getLogger("acb")

_MAX_PROGRAMS = 64
_BLOCK = 1024
_GATHER_BLOCK = 8192  # elements a program moves per iteration of a gather: a few large steps keep NVLink busy
_SPIN = 2**31 - 1  # polls before a wait gives up (minutes: a peer is gone)


def setup_one_shot(
    store,
    rank: int,
    world: int,
    device: torch.device,
    max_bytes: int,
    mode: str = "push",
    tag: str = "",
    gather_bytes: int = 0,
) -> OneShot | None:
    """Every rank calls this at the same time; returns the all-reduce, or None on every rank when any rank cannot
    map its peers' memory (then NCCL does every sum). ``tag`` tells apart several set-ups on one store."""
    prefix = f"acb/one-shot{tag}"
    key = f"{prefix}/{rank}"
    one = None
    try:
        one = OneShot(rank, world, device, max_bytes, mode, gather_bytes)
        from torch.multiprocessing.reductions import reduce_tensor

        store.set(key, pickle.dumps(reduce_tensor(one.buffer)))
    except Exception as exc:  # no peer access, no Triton: say so, and let every rank fall back together
        log.warning("the one-shot all-reduce is off on rank %d (%s); NCCL does every sum", rank, exc)
        store.set(key, b"")
    shared = [store.get(f"{prefix}/{r}") for r in range(world)]
    if one is None or not all(shared):
        return None
    ok = True
    try:
        one.connect([pickle.loads(s) for s in shared])
    except Exception as exc:
        log.warning("the one-shot all-reduce is off: rank %d could not map its peers' buffers (%s)", rank, exc)
        ok = False
    if not _agree(store, f"{prefix}-mapped", rank, world, ok):  # a sum with a rank missing would wait for it
        return None
    t = torch.full((4096,), rank + 1.0, dtype=torch.float32, device=device)  # a first sum, checked
    ok = bool((one(t) == world * (world + 1) / 2).all())
    if one.gather_bytes:  # and a first gather, on every rank whatever its sum gave (a rank left out would wait)
        g = torch.full((3, 5), rank, dtype=torch.float32, device=device)
        got = one.gather_last(g).view(3, world, 5)
        ok = bool((got == torch.arange(world, device=device)[:, None]).all()) and ok
    if not ok:
        log.warning("the one-shot all-reduce is off: its first sum or gather was wrong on rank %d", rank)
    return one if _agree(store, f"{prefix}-ok", rank, world, ok) else None


def _agree(store, key: str, rank: int, world: int, ok: bool) -> bool:
    """True on every rank if ``ok`` on every rank (a barrier through the store)."""
    store.set(f"{key}/{rank}", b"1" if ok else b"0")
    return all(store.get(f"{key}/{r}") == b"1" for r in range(world))


class OneShot:
    """``mode``: ``"push"`` (each rank writes its input into every rank's buffer, then sums its own) or ``"pull"``
    (each rank writes its own buffer, then reads every rank's). Sums of up to ``max_bytes``; in push mode, gathers
    (:meth:`gather_last`) of up to ``gather_bytes`` per rank too.

    The kernels signal with inline PTX on CUDA (one release fence, then a posted store per peer); ``ACB_ONE_SHOT_ASM=0``
    in the environment picks Triton's atomics instead (what the interpreter runs)."""

    def __init__(self, rank: int, world: int, device: torch.device, max_bytes: int, mode: str = "push",
                 gather_bytes: int = 0) -> None:  # fmt: skip
        if mode not in ("push", "pull"):
            raise ValueError(f"one-shot mode must be push or pull, not {mode!r}")
        self.mode = mode
        for r in range(world):  # rank r runs on the r-th GPU after rank 0's
            peer = device.index - rank + r
            if r != rank and not torch.cuda.can_device_access_peer(device, peer):
                raise RuntimeError(f"GPU {device.index} cannot access GPU {peer}")
        self.rank, self.world, self.device, self.max_bytes = rank, world, device, max_bytes
        self.gather_bytes = gather_bytes if mode == "push" else 0
        self._asm = device.type == "cuda" and os.environ.get("ACB_ONE_SHOT_ASM", "1") != "0"
        self._flag_words = _MAX_PROGRAMS * world
        # slots 128-byte aligned: the kernels move 16-byte vectors
        slot_words = -(-max(max_bytes, self.gather_bytes) // 128) * 16
        # one allocation: flags [programs, world] int64, then two regions (alternate calls) of one slot (pull) or of
        # one slot per rank (push); shared whole with the peers
        parts = 2 * (world if mode == "push" else 1)
        self.buffer = torch.zeros(self._flag_words + parts * slot_words, dtype=torch.int64, device=device)
        self._slot_bytes = slot_words * 8
        self._counter = torch.zeros(_MAX_PROGRAMS, dtype=torch.int64, device=device)
        self._peers: list[torch.Tensor] = []
        self._bases: torch.Tensor | None = None
        # the abort word, in pinned host memory (the GPU reads it through the same address): set when a peer died,
        # it ends the kernels waiting for that peer's signal
        self._abort = torch.zeros(1, dtype=torch.int32).pin_memory()

    def connect(self, handles: list) -> None:
        """Map every peer's buffer (``handles``: each rank's ``reduce_tensor`` of its buffer, in rank order)."""
        bases = []
        mine = self.device.index
        for r, (rebuild, args) in enumerate(handles):
            if r == self.rank:
                bases.append(self.buffer.data_ptr())
                continue
            peer_device = mine - self.rank + r
            # This GPU's kernels read and signal the peer's memory: peer access must be on from this GPU to the
            # peer's. A copy from here to there turns it on (torch enables it for its peer copies) ...
            torch.empty(1, device=torch.device("cuda", peer_device)).copy_(torch.zeros(1, device=self.device))
            # ... and the handle is opened in this GPU's context (as CUDA IPC users do), not the exporter's, which
            # torch's rebuild would pick: argument 6 is the device it opens the handle under.
            args = list(args)
            args[list(inspect.signature(rebuild).parameters).index("storage_device")] = mine
            peer = rebuild(*args)
            self._peers.append(peer)  # keep the mapping open
            bases.append(peer.data_ptr())
        bases.append(self._abort.data_ptr())
        self._bases = torch.tensor(bases, dtype=torch.int64, device=self.device)
        torch.cuda.synchronize(self.device)

    def abort(self) -> None:
        """A peer died: every wait for a signal, now or later, ends (the sums are garbage from then on)."""
        self._abort[0] = 1

    def fits(self, t: torch.Tensor) -> bool:
        return t.is_contiguous() and t.numel() * t.element_size() <= self.max_bytes and t.dtype in _TL

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (every rank must call with the same shape, in the same order)."""
        from ..kernels import one_shot

        kernel = one_shot.one_shot_push if self.mode == "push" else one_shot.one_shot
        n = t.numel()
        # Always every program, whatever n: program p then always handles the same chunks (p, p + programs, ...),
        # so its epochs alternate the regions of those chunks call after call (with fewer programs for a smaller
        # call, a chunk would change hands and could be rewritten while a peer still reads it).
        kernel[(_MAX_PROGRAMS,)](t, n, self._bases, self._counter, self._flag_words * 8, self._slot_bytes,
                            RANK=self.rank, WORLD=self.world, BLOCK=_BLOCK, SPIN=_SPIN, ASM=self._asm)  # fmt: skip
        return t

    def fits_gather(self, t: torch.Tensor) -> bool:
        """Whether :meth:`gather_last` takes ``t``."""
        return (t.dim() == 2 and t.is_contiguous() and t.dtype in _TL
                and 0 < t.numel() * t.element_size() <= self.gather_bytes)  # fmt: skip

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t [rows, cols]`` side by side: ``[rows, world * cols]`` in rank order, one kernel (every
        rank must call with the same shape, in the same order)."""
        from ..kernels import one_shot

        rows, cols = t.shape
        out = torch.empty((rows, self.world * cols), dtype=t.dtype, device=t.device)
        one_shot.one_shot_gather[(_MAX_PROGRAMS,)](
            t, out, t.numel(), cols, self._bases, self._counter, self._flag_words * 8, self._slot_bytes,
            RANK=self.rank, WORLD=self.world, BLOCK=_GATHER_BLOCK, SPIN=_SPIN, ASM=self._asm, num_warps=8,
        )  # fmt: skip
        return out

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``x`` summed over the ranks, added into ``residual`` (in place), RMSNorm'd with ``weight``: one kernel
        for the all-reduce and the norm after it (``push`` mode; ``x`` as :meth:`fits` takes, ``residual`` the same
        shape and contiguous). Returns the normed rows; ``x`` keeps this rank's part."""
        from ..kernels import one_shot

        rows, cols = x.shape
        out = torch.empty_like(x)
        one_shot.one_shot_push_norm[(_MAX_PROGRAMS,)](
            x, residual, weight, out, rows, cols, eps, self._bases, self._counter, self._flag_words * 8,
            self._slot_bytes, RANK=self.rank, WORLD=self.world, BLOCK=1 << (cols - 1).bit_length(), SPIN=_SPIN,
            ASM=self._asm, num_warps=8 if cols >= 4096 else 4,
        )  # fmt: skip
        return out

    def fits_norm(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether :meth:`add_rmsnorm` takes these: push mode, rows no wider than :data:`MAX_NORM_COLS`."""
        return (self.mode == "push" and x.dim() == 2 and x.shape[1] <= MAX_NORM_COLS and self.fits(x)
                and residual.is_contiguous() and residual.shape == x.shape)  # fmt: skip


MAX_NORM_COLS = 16384
"""The widest row :meth:`OneShot.add_rmsnorm` normalizes in one program (a hidden size)."""


_TL = (torch.bfloat16, torch.float16, torch.float32)
