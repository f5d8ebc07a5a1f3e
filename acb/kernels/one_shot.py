"""The kernel of :mod:`acb.parallel.allreduce`: copy, signal, wait, sum (the protocol is described there)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["one_shot", "one_shot_push", "one_shot_push_norm"]


@triton.jit
def _barrier(BASES, pid, epoch, RANK: tl.constexpr, WORLD: tl.constexpr, SPIN: tl.constexpr):
    """Signal every rank (this program's flag at ``[pid, RANK]`` in each rank's buffer), then wait for every rank's
    signal in this rank's flags (``[pid, r]``) to reach ``epoch``. The wait ends early when the abort word (host
    memory, ``BASES[WORLD]``) is set: a peer died and will never signal; at most ``SPIN`` polls per rank anyway."""
    tl.debug_barrier()  # every thread of the program wrote its part before the signal (release is cumulative)
    for r in tl.static_range(WORLD):
        flags = tl.load(BASES + r).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(flags + pid * WORLD + RANK, epoch, sem="release", scope="sys")
    mine = tl.load(BASES + RANK).to(tl.pointer_type(tl.int64))
    abort = tl.load(BASES + WORLD).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(WORLD):
        polls = 0
        seen = tl.atomic_add(mine + pid * WORLD + r, 0, sem="acquire", scope="sys")
        while (seen < epoch) & (polls < SPIN):
            seen = tl.atomic_add(mine + pid * WORLD + r, 0, sem="acquire", scope="sys")
            polls += 1
            if polls % 4096 == 0:  # a read over PCIe: now and then
                if tl.load(abort, volatile=True) != 0:
                    polls = SPIN
    tl.debug_barrier()


@triton.jit
def one_shot(X, n, BASES, COUNTER, flag_bytes, slot_bytes, RANK: tl.constexpr, WORLD: tl.constexpr,
             BLOCK: tl.constexpr, SPIN: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    epoch = tl.load(COUNTER + pid) + 1
    slot = flag_bytes + (epoch % 2) * slot_bytes  # byte offset of this call's slot in every rank's buffer
    ty = X.dtype.element_ty
    mine = (tl.load(BASES + RANK) + slot).to(tl.pointer_type(ty))
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(mine + offs, tl.load(X + offs, mask=m), mask=m)
    _barrier(BASES, pid, epoch, RANK, WORLD, SPIN)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order: every rank adds the same numbers in the same order
            peer = (tl.load(BASES + r) + slot).to(tl.pointer_type(ty))
            acc += tl.load(peer + offs, mask=m, other=0.0, volatile=True).to(tl.float32)
        tl.store(X + offs, acc.to(ty), mask=m)
    tl.store(COUNTER + pid, epoch)


@triton.jit
def one_shot_push(X, n, BASES, COUNTER, flag_bytes, slot_bytes, RANK: tl.constexpr, WORLD: tl.constexpr,
                  BLOCK: tl.constexpr, SPIN: tl.constexpr):  # fmt: skip
    """The same sum with the data pushed: each rank writes its input into every rank's buffer (its own part of this
    call's region), signals, waits, and sums its own buffer. Stores to a peer are posted over NVLink, where the
    reads of :func:`one_shot` each wait a round trip."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    epoch = tl.load(COUNTER + pid) + 1
    region = flag_bytes + (epoch % 2) * WORLD * slot_bytes  # this call's region in every rank's buffer
    ty = X.dtype.element_ty
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m)
        for r in tl.static_range(WORLD):
            dst = (tl.load(BASES + r) + region + RANK * slot_bytes).to(tl.pointer_type(ty))
            tl.store(dst + offs, x, mask=m)
    _barrier(BASES, pid, epoch, RANK, WORLD, SPIN)
    mine = tl.load(BASES + RANK) + region
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order: every rank adds the same numbers in the same order
            part = (mine + r * slot_bytes).to(tl.pointer_type(ty))
            acc += tl.load(part + offs, mask=m, other=0.0, volatile=True).to(tl.float32)
        tl.store(X + offs, acc.to(ty), mask=m)
    tl.store(COUNTER + pid, epoch)


@triton.jit
def one_shot_push_norm(X, R, G, OUT, rows, cols, eps, BASES, COUNTER, flag_bytes, slot_bytes, RANK: tl.constexpr,
                       WORLD: tl.constexpr, BLOCK: tl.constexpr, SPIN: tl.constexpr):  # fmt: skip
    """:func:`one_shot_push`'s sum of ``X [rows, cols]`` followed by the residual add and RMSNorm of
    :func:`acb.kernels.fused.add_rmsnorm`, in one kernel: ``R += sum`` (in place), ``OUT = RMSNorm(R) * G``; ``X``
    is left as it was. The roundings are the two kernels': the sum is rounded to X's dtype before the add. Each
    program pushes and sums whole rows (``pid``, ``pid + programs``, ...), so the barrier it passes covers every row
    it normalizes; every program runs every call, rows or not, so that the epochs stay in step."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    epoch = tl.load(COUNTER + pid) + 1
    region = flag_bytes + (epoch % 2) * WORLD * slot_bytes
    ty = X.dtype.element_ty
    c = tl.arange(0, BLOCK)
    m = c < cols
    for row in range(pid, rows, programs):
        x = tl.load(X + row * cols + c, mask=m)
        for r in tl.static_range(WORLD):
            dst = (tl.load(BASES + r) + region + RANK * slot_bytes).to(tl.pointer_type(ty))
            tl.store(dst + row * cols + c, x, mask=m)
    _barrier(BASES, pid, epoch, RANK, WORLD, SPIN)
    mine = tl.load(BASES + RANK) + region
    for row in range(pid, rows, programs):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order: every rank adds the same numbers in the same order
            part = (mine + r * slot_bytes).to(tl.pointer_type(ty))
            acc += tl.load(part + row * cols + c, mask=m, other=0.0, volatile=True).to(tl.float32)
        x = acc.to(ty).to(tl.float32) + tl.load(R + row * cols + c, mask=m, other=0.0).to(tl.float32)
        tl.store(R + row * cols + c, x.to(R.dtype.element_ty), mask=m)
        y = x * tl.rsqrt(tl.sum(x * x, 0) / cols + eps)
        w = tl.load(G + c, mask=m, other=0.0)
        tl.store(OUT + row * cols + c, (y.to(G.dtype.element_ty) * w).to(OUT.dtype.element_ty), mask=m)
    tl.store(COUNTER + pid, epoch)
