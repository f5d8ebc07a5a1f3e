"""The kernels of :mod:`acb.parallel.allreduce`: copy, signal, wait, sum or gather (the protocol is described there)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["one_shot", "one_shot_gather", "one_shot_push", "one_shot_push_norm"]


@triton.jit
def _barrier(BASES, pid, epoch, RANK: tl.constexpr, WORLD: tl.constexpr, SPIN: tl.constexpr, ASM: tl.constexpr):
    """Signal every peer (this program's flag at ``[pid, RANK]`` in each peer's buffer), then wait for every peer's
    signal in this rank's flags (``[pid, r]``) to reach ``epoch``. A program reads back only what it wrote itself or
    what the peers pushed, so it signals and waits for peers alone. The wait ends early when the abort word (host
    memory, ``BASES[WORLD]``) is set: a peer died and will never signal; at most ``SPIN`` polls per peer anyway.

    ``ASM``: thread 0 makes one release fence at system scope, posts a relaxed store to each peer's flag, and polls
    with acquire loads while the other threads wait at the barrier (inline PTX, CUDA only). Otherwise Triton's
    atomics: one release exchange per peer (each one's fence waits for the previous exchange's round trip) and
    acquire polls; what the interpreter runs."""
    tl.debug_barrier()  # every thread of the program wrote its part before the signal (release is cumulative)
    if ASM:
        _fence_release(epoch)
    for r in tl.static_range(WORLD):
        if r != RANK:
            flags = tl.load(BASES + r).to(tl.pointer_type(tl.int64))
            if ASM:
                _post(flags + pid * WORLD + RANK, epoch)
            else:
                tl.atomic_xchg(flags + pid * WORLD + RANK, epoch, sem="release", scope="sys")
    mine = tl.load(BASES + RANK).to(tl.pointer_type(tl.int64))
    abort = tl.load(BASES + WORLD).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(WORLD):
        if r != RANK:
            polls = 0
            seen = _acquire(mine + pid * WORLD + r, ASM)
            while (seen < epoch) & (polls < SPIN):
                seen = _acquire(mine + pid * WORLD + r, ASM)
                polls += 1
                if polls % 4096 == 0:  # a read over PCIe: now and then
                    if tl.load(abort, volatile=True) != 0:
                        polls = SPIN
    tl.debug_barrier()


@triton.jit
def _fence_release(anchor):
    """Thread 0: every write this program made before it (the block's, through the barrier before) is visible at
    system scope before any write after it. (``anchor``, an unused operand, orders it after what computed it.)"""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; @p fence.acq_rel.sys; mov.u32 $0, 0; }",
        "=r,l", [anchor.to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _post(flag, value):
    """Thread 0: a relaxed store of ``value`` at ``flag`` (system scope); after :func:`_fence_release`, a release."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p st.relaxed.sys.global.b64 [$1], $2; mov.u32 $0, 0; }",
        "=r,l,l", [flag, value.to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _acquire(flag, ASM: tl.constexpr):
    """The flag's value, an acquire load at system scope. ``ASM``: thread 0 alone reads it (the others get the
    largest int64 and go on to the barrier that ends :func:`_barrier`, where they wait for thread 0; that barrier
    orders their reads after its acquire)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; mov.b64 $0, 0x7fffffffffffffff; "
            "@p ld.acquire.sys.global.b64 $0, [$1]; }",
            "=l,l", [flag], dtype=tl.int64, is_pure=False, pack=1)  # fmt: skip
    else:
        return tl.atomic_add(flag, 0, sem="acquire", scope="sys")


@triton.jit
def one_shot(X, n, BASES, COUNTER, flag_bytes, slot_bytes, RANK: tl.constexpr, WORLD: tl.constexpr,
             BLOCK: tl.constexpr, SPIN: tl.constexpr, ASM: tl.constexpr = False):  # fmt: skip
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    epoch = tl.load(COUNTER + pid) + 1
    slot = flag_bytes + (epoch % 2) * slot_bytes.to(tl.int64)  # byte offset of this call's slot in every rank's buffer
    ty = X.dtype.element_ty
    mine = tl.multiple_of((tl.load(BASES + RANK) + slot).to(tl.pointer_type(ty)), 16)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(mine + offs, tl.load(X + offs, mask=m), mask=m)
    _barrier(BASES, pid, epoch, RANK, WORLD, SPIN, ASM)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order: every rank adds the same numbers in the same order
            peer = tl.multiple_of((tl.load(BASES + r) + slot).to(tl.pointer_type(ty)), 16)
            acc += tl.load(peer + offs, mask=m, other=0.0, volatile=True).to(tl.float32)
        tl.store(X + offs, acc.to(ty), mask=m)
    tl.store(COUNTER + pid, epoch)


@triton.jit
def one_shot_push(X, n, BASES, COUNTER, flag_bytes, slot_bytes, RANK: tl.constexpr, WORLD: tl.constexpr,
                  BLOCK: tl.constexpr, SPIN: tl.constexpr, ASM: tl.constexpr = False):  # fmt: skip
    """The same sum with the data pushed: each rank writes its input into every rank's buffer (its own part of this
    call's region), signals, waits, and sums its own buffer. Stores to a peer are posted over NVLink, where the
    reads of :func:`one_shot` each wait a round trip."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    epoch = tl.load(COUNTER + pid) + 1
    region = flag_bytes + (epoch % 2) * WORLD * slot_bytes.to(tl.int64)  # this call's region in every rank's buffer
    own = region + RANK * slot_bytes.to(tl.int64)  # this rank's part of the region (int64 offsets)
    ty = X.dtype.element_ty
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m)
        for r in tl.static_range(WORLD):
            dst = tl.multiple_of((tl.load(BASES + r) + own).to(tl.pointer_type(ty)), 16)
            tl.store(dst + offs, x, mask=m)
    _barrier(BASES, pid, epoch, RANK, WORLD, SPIN, ASM)
    mine = tl.load(BASES + RANK) + region
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order: every rank adds the same numbers in the same order
            part = tl.multiple_of((mine + r * slot_bytes.to(tl.int64)).to(tl.pointer_type(ty)), 16)
            acc += tl.load(part + offs, mask=m, other=0.0, volatile=True).to(tl.float32)
        tl.store(X + offs, acc.to(ty), mask=m)
    tl.store(COUNTER + pid, epoch)


@triton.jit
def one_shot_push_norm(X, R, G, OUT, rows, cols, eps, BASES, COUNTER, flag_bytes, slot_bytes, RANK: tl.constexpr,
                       WORLD: tl.constexpr, BLOCK: tl.constexpr, SPIN: tl.constexpr,
                       ASM: tl.constexpr = False):  # fmt: skip
    """:func:`one_shot_push`'s sum of ``X [rows, cols]`` followed by the residual add and RMSNorm of
    :func:`acb.kernels.fused.add_rmsnorm`, in one kernel: ``R += sum`` (in place), ``OUT = RMSNorm(R) * G``; ``X``
    is left as it was. The roundings are the two kernels': the sum is rounded to X's dtype before the add. Each
    program pushes and sums whole rows (``pid``, ``pid + programs``, ...), so the barrier it passes covers every row
    it normalizes; every program runs every call, rows or not, so that the epochs stay in step."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    epoch = tl.load(COUNTER + pid) + 1
    region = flag_bytes + (epoch % 2) * WORLD * slot_bytes.to(tl.int64)
    own = region + RANK * slot_bytes.to(tl.int64)  # this rank's part of the region (int64 offsets)
    ty = X.dtype.element_ty
    c = tl.arange(0, BLOCK)
    m = c < cols
    for row in range(pid, rows, programs):
        x = tl.load(X + row * cols + c, mask=m)
        for r in tl.static_range(WORLD):
            dst = tl.multiple_of((tl.load(BASES + r) + own).to(tl.pointer_type(ty)), 16)
            tl.store(dst + row * cols + c, x, mask=m)
    _barrier(BASES, pid, epoch, RANK, WORLD, SPIN, ASM)
    mine = tl.load(BASES + RANK) + region
    for row in range(pid, rows, programs):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order: every rank adds the same numbers in the same order
            part = tl.multiple_of((mine + r * slot_bytes.to(tl.int64)).to(tl.pointer_type(ty)), 16)
            acc += tl.load(part + row * cols + c, mask=m, other=0.0, volatile=True).to(tl.float32)
        x = acc.to(ty).to(tl.float32) + tl.load(R + row * cols + c, mask=m, other=0.0).to(tl.float32)
        tl.store(R + row * cols + c, x.to(R.dtype.element_ty), mask=m)
        y = x * tl.rsqrt(tl.sum(x * x, 0) / cols + eps)
        w = tl.load(G + c, mask=m, other=0.0)
        tl.store(OUT + row * cols + c, (y.to(G.dtype.element_ty) * w).to(OUT.dtype.element_ty), mask=m)
    tl.store(COUNTER + pid, epoch)


@triton.jit
def one_shot_gather(X, OUT, n, cols, BASES, COUNTER, flag_bytes, slot_bytes, RANK: tl.constexpr, WORLD: tl.constexpr,
                    BLOCK: tl.constexpr, SPIN: tl.constexpr, ASM: tl.constexpr = False):  # fmt: skip
    """Every rank's ``X [rows, cols]`` side by side in ``OUT [rows, WORLD * cols]`` (rank order; ``n = rows * cols``):
    each program writes its chunks of ``X`` into its own columns of ``OUT`` and pushes them into every peer's buffer
    (this rank's part of the call's region), signals, waits, and copies the peers' parts from its own buffer into
    their columns. The same chunks each call (as :func:`one_shot_push`), so the barrier it passes covers them."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    epoch = tl.load(COUNTER + pid) + 1
    region = flag_bytes + (epoch % 2) * WORLD * slot_bytes.to(tl.int64)
    own = region + RANK * slot_bytes.to(tl.int64)  # this rank's part of the region (int64 offsets)
    ty = X.dtype.element_ty
    width = WORLD * cols
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m)
        for r in tl.static_range(WORLD):
            if r != RANK:
                dst = tl.multiple_of((tl.load(BASES + r) + own).to(tl.pointer_type(ty)), 16)
                tl.store(dst + offs, x, mask=m)
        tl.store(OUT + (offs // cols) * width + RANK * cols + offs % cols, x, mask=m)
    _barrier(BASES, pid, epoch, RANK, WORLD, SPIN, ASM)
    mine = tl.load(BASES + RANK) + region
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        for r in tl.static_range(WORLD):
            if r != RANK:
                part = tl.multiple_of((mine + r * slot_bytes.to(tl.int64)).to(tl.pointer_type(ty)), 16)
                x = tl.load(part + offs, mask=m, volatile=True)
                tl.store(OUT + (offs // cols) * width + r * cols + offs % cols, x, mask=m)
    tl.store(COUNTER + pid, epoch)
