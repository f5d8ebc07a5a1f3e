"""A decode step's work between two attentions in one persistent kernel.

Between layer ``i``'s attention and layer ``i + 1``'s, the lean decode step runs eight kernels one op each: output
projection, residual add + norm, gate/up with its activation, down projection (cuBLAS splits it: two kernels), the
next residual add + norm, the fused Q/K/V projection. At 1-3B shapes each kernel pays 2-5 µs of launch, ramp-up and
tail on top of its reading time, about as much as the reading itself (docs/benchmarks.md, issue 16).

:func:`between_attentions` runs all of it as one launch of one program per SM, in six phases:

====  ============================================  ===========================================================
 A    output projection                             every program its share of the weights (stream-K, below);
                                                    partial sums in float32
 B    one row per task: residual add + RMSNorm      waits for every A share; sums each column's pieces in order
 C    gate/up + activation                          waits for every B row; each program its share; a tile's
                                                    last piece to finish sums the pieces, applies the activation
 D    down projection                               waits for every C tile; each program its share
 E    one row per task: residual add + RMSNorm (the waits for every D share (or reads the embeddings: the first
      next layer's input norm, or the final norm)   layer)
 F    next layer's Q/K/V                            waits for every E row; each program its share; a tile's last
                                                    piece sums the pieces (and the bias) and writes it
====  ============================================  ===========================================================

**Stream-K.** A GEMM phase is ``tiles x k_blocks`` iterations (a column tile of BLOCK_N weight rows times a block of
K), numbered tile-major and cut into equal contiguous shares, one per program. A share may end inside a tile and the
next share go on with it: each program's piece of a tile is one pipelined loop, stored as partial sums in a slot
numbered by the program's place among the tile's programs. Every program thus reads the same bytes, whatever the
shapes: with whole tiles dealt out instead, 140 gate/up tiles on 132 SMs (qwen2.5-1.5b) took two rounds, and 72 Q/K/V
tiles (mistral-3b) left half the SMs idle.

A task waits by reading a counter that the tasks it needs increment when done. Every task waits only for tasks of
earlier phases, and every program takes its tasks in phase order, so no deadlock as long as all programs can be
resident at once (one per SM). Other work on the GPU only delays programs that are not resident yet, with one
exception: two of these kernels running at once (two engines on streams of their own in one process, or two
processes sharing the GPU through MPS) can each hold SMs that the other's waiting programs need. acb launches on the
current stream, so engines in one process take turns unless their caller gives them streams; ``ACB_PERSISTENT=0`` is
for the rest.

Pieces are added in slot order whoever finishes last, so results do not depend on timing. The last program to
finish zeroes the counters for the next launch (a CUDA graph replays it as it is).

The arithmetic is the per-op path's: products accumulated in float32 and rounded once to the model's dtype (a
GEMM's output), norms as :func:`acb.kernels.fused.add_rmsnorm` computes them (the same code), the activation as
:func:`acb.kernels.fused.gate_up_act`'s.

Under Triton's interpreter (the CPU tests) the grid is one program, which runs the shares of ``split_target``
programs one after another: the tiles are cut into pieces as on the card.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fused import _gated, _norm_row

__all__ = ["between_attentions", "new_counters", "PERSISTENT_ROWS", "COUNTERS", "Tuning", "TUNING"]

# Steps of at most this many rows (decode steps); more rows are compute-bound, where cuBLAS's wide tiles belong.
PERSISTENT_ROWS = 64

# The counters, int32: [0] programs done, [1] A shares done, [2] B rows, [3] C tiles, [4] D shares, [5] E rows;
# from [TICKETS]: the pieces of each gate/up tile done, then of each Q/K/V tile.
COUNTERS = 2048
TICKETS: tl.constexpr = tl.constexpr(8)
_COUNTERS: tl.constexpr = tl.constexpr(COUNTERS)

BLOCK_N = 64  # weight rows (output columns) per tile


@dataclass(frozen=True)
class Tuning:
    """How the kernel is launched (``python -m bench.persistent --sweep`` times the choices)."""

    block_k: int = 128  # K per block for 2-byte weights; 4-byte ones take half (the same bytes)
    stages: int = 5  # blocks in flight per program (Triton's software pipeline)
    per_sm: int = 1  # programs per SM (all must be resident at once)
    unroll: int = 4  # pieces' partial sums loaded this many at a time


TUNING = Tuning()


@triton.jit
def _wait(CNT, idx, target):
    """Spin until counter ``idx`` reaches ``target``; then this program's reads see what those tasks wrote."""
    while tl.load(CNT + idx, volatile=True) < target:
        pass
    tl.atomic_add(CNT + idx, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _signal(CNT, idx):
    """This task's writes are done: count it."""
    tl.debug_barrier()  # every thread's stores are issued before the (one) atomic releases them
    tl.atomic_add(CNT + idx, 1, sem="release")


@triton.jit
def _now(dummy):
    """The GPU's global nanosecond timer (for ``trace``)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64, is_pure=False,
                                     pack=1)  # fmt: skip


@triton.jit
def _owner(it, iters, S):
    """The share that holds iteration ``it`` of a phase of ``iters`` iterations cut into ``S <= iters`` shares."""
    return ((it + 1) * S - 1) // iters


@triton.jit
def _share(v, iters, S):
    """``[lo, hi)``: the iterations of share ``v`` (none from share ``S`` on)."""
    return tl.minimum(v, S) * iters // S, tl.minimum(v + 1, S) * iters // S


@triton.jit
def _tile(X, s_x, W, s_w, U, s_u, M, N, n0, k_lo, k_hi, BLOCK_M: tl.constexpr, EVEN: tl.constexpr,
          PRECISION: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TWO: tl.constexpr):  # fmt: skip
    """``acc[n, m] = sum_k W[n0 + n, k] X[m, k]`` over ``k_lo <= k < k_hi`` (float32 ``[BN, BLOCK_M]``): the
    weights on the tensor cores' M side, which a few rows would leave mostly empty. ``k_lo`` is a multiple of BK.
    Returns ``(acc, acc_u)``: with ``TWO``, ``acc_u`` is the same product of ``U`` (gate and up in one loop), else
    zeros."""
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    xp = X + rm[:, None] * s_x + (k_lo + rk)[None, :]
    wp = W + rn[:, None].to(tl.int64) * s_w + (k_lo + rk)[None, :]
    up = U + rn[:, None].to(tl.int64) * s_u + (k_lo + rk)[None, :]
    rows = rm[:, None] < M
    acc = tl.zeros((BN, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BN, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        if EVEN:  # K a multiple of BK and N of BN: only the rows are masked
            x = tl.load(xp, mask=rows, other=0.0, cache_modifier=".cg")
            w = tl.load(wp)
            if TWO:
                u = tl.load(up)
        else:
            ks = (k0 + rk)[None, :] < k_hi
            x = tl.load(xp, mask=rows & ks, other=0.0, cache_modifier=".cg")
            w = tl.load(wp, mask=(rn[:, None] < N) & ks, other=0.0)
            if TWO:
                u = tl.load(up, mask=(rn[:, None] < N) & ks, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        if TWO:
            acc_u = tl.dot(u, tl.trans(x), acc_u, input_precision=PRECISION)
        xp += BK
        wp += BK
        up += BK
    return acc, acc_u


@triton.jit
def _tile_at(P, s, M, N, n0, BLOCK_M: tl.constexpr, BN: tl.constexpr):
    """``(pointers, mask)`` of a :func:`_tile`-shaped ``[BN, BLOCK_M]`` tile (columns ``n0 ..``, every row) of slice
    ``s`` of ``P [slices, M, N]``: a piece's partial sums, or (slice 0) an output ``[M, N]``."""
    rm = tl.arange(0, BLOCK_M)[None, :]
    rn = n0 + tl.arange(0, BN)[:, None]
    return P + (s * M + rm) * N + rn, (rm < M) & (rn < N)


@triton.jit
def _sum_tile(P, pieces, M, N, n0, BLOCK_M: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr):
    """The ``pieces`` partial tiles of columns ``n0 ..`` in ``P [slots, M, N]`` summed in slot order (float32),
    UNROLL loads in flight at a time."""
    acc = tl.zeros((BN, BLOCK_M), dtype=tl.float32)
    for j0 in range(0, pieces, UNROLL):
        for i in tl.static_range(UNROLL):
            ptr, mask = _tile_at(P, j0 + i, M, N, n0, BLOCK_M, BN)
            acc += tl.load(ptr, mask=mask & (tl.full(mask.shape, j0 + i, tl.int32) < pieces), other=0.0,
                           cache_modifier=".cg")  # fmt: skip
    return acc


@triton.jit
def _sum_row(P, max_pieces, M, N, row, cols, mask, kb, iters, S, BLOCK_H: tl.constexpr, BN: tl.constexpr,
             UNROLL: tl.constexpr):  # fmt: skip
    """Row ``row`` of a stream-K phase's output (``kb`` blocks per tile, ``iters`` iterations, ``S`` shares): each
    column's pieces in ``P [slots, M, N]`` summed in slot order (float32), UNROLL loads in flight at a time."""
    first = _owner(cols // BN * kb, iters, S)
    pieces = _owner(cols // BN * kb + kb - 1, iters, S) - first + 1
    x = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j0 in range(0, max_pieces, UNROLL):
        for i in tl.static_range(UNROLL):
            x += tl.load(P + ((j0 + i) * M + row) * N + cols, mask=mask & (j0 + i < pieces), other=0.0,
                         cache_modifier=".cg")  # fmt: skip
    return x


@triton.jit(do_not_specialize=["M", "G", "V", "pa_max", "pd_max", "has_mlp", "NQKV"])
def _between_kernel(
    ATT, WO, LN2, PA, WG, WU, WD, PART_A, X2, PART_C, ACT, PART_D,
    H_IN, R, NW, PM, X1, WQKV, BQKV, PART_F, QKV, CNT, TR,
    M, G, V, HID, DQ, INTER, NQKV, s_o, s_wo, s_g, s_u, s_wd, s_wqkv, s_h,
    pa_max, pd_max, embed_scale, eps, has_mlp,
    HAS_PA: tl.constexpr, HAS_PM: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_FN: tl.constexpr,
    EVEN_A: tl.constexpr, EVEN_C: tl.constexpr, EVEN_D: tl.constexpr, EVEN_F: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_H: tl.constexpr,
    UNROLL: tl.constexpr, TRACE: tl.constexpr,
):  # fmt: skip
    # One compiled variant serves a step's first launch (has_mlp 0: no A-D), its middle ones and its last (NQKV 0:
    # no F): the flags that tell them apart are run-time values. Program pid runs shares pid, pid + G, ... of V
    # (V = G on the card). TRACE: [phase, start, wait over, end] per phase into TR [G, 6, 4] (its last share's).
    pid = tl.program_id(0)
    ty = X1.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)  # a row of the hidden size, for the norms
    cmask = cols < HID
    tiles_h = tl.cdiv(HID, BN)
    tiles_c = tl.cdiv(INTER, BN) * has_mlp
    tiles_f = tl.cdiv(NQKV, BN)
    kb_a, kb_c, kb_d, kb_f = tl.cdiv(DQ, BK), tl.cdiv(HID, BK), tl.cdiv(INTER, BK), tl.cdiv(HID, BK)
    it_a, it_c, it_d, it_f = tiles_h * kb_a * has_mlp, tiles_c * kb_c, tiles_h * kb_d * has_mlp, tiles_f * kb_f
    tk_f = TICKETS + tiles_c
    # each phase in at most V shares, none empty (a share of no iterations would break _owner's count of pieces)
    sh_a, sh_c = tl.maximum(1, tl.minimum(V, it_a)), tl.maximum(1, tl.minimum(V, it_c))
    sh_d, sh_f = tl.maximum(1, tl.minimum(V, it_d)), tl.maximum(1, tl.minimum(V, it_f))

    # A: the output projection, this program's shares; each piece's partial sums in its slot
    if TRACE:
        t0 = _now(pid)
    for v in range(pid, V * has_mlp, G):
        it, hi = _share(v, it_a, sh_a)
        while it < hi:
            tile = it // kb_a
            k1 = tl.minimum(kb_a, hi - tile * kb_a)
            acc, _ = _tile(ATT, s_o, WO, s_wo, WO, s_wo, M, HID, tile * BN, (it - tile * kb_a) * BK,
                           tl.minimum(k1 * BK, DQ), BLOCK_M, EVEN_A, PRECISION, BN, BK, False)  # fmt: skip
            ptr, mask = _tile_at(PART_A, v - _owner(tile * kb_a, it_a, sh_a), M, HID, tile * BN, BLOCK_M, BN)
            tl.store(ptr, acc, mask=mask)
            it = tile * kb_a + k1
        _signal(CNT, 1)
    if TRACE:
        _trace(TR, pid, 0, t0, t0, has_mlp)

    # B: residual add + the norm before the MLP, one row per task
    for row in range(pid, M * has_mlp, G):
        if TRACE:
            t0 = _now(pid)
        _wait(CNT, 1, V)
        if TRACE:
            t1 = _now(pid)
        x = _sum_row(PART_A, pa_max, M, HID, row, cols, cmask, kb_a, it_a, sh_a, BLOCK_H, BN, UNROLL)
        out = _norm_row(x.to(ty).to(tl.float32), cols, cmask, HID, eps, R + row * s_h, LN2, PA, ty, True, HAS_PA)
        tl.store(X2 + row * s_h + cols, out, mask=cmask)
        _signal(CNT, 2)
        if TRACE:
            _trace(TR, pid, 1, t0, t1, 1)

    # C: gate/up and the activation; a tile's last piece to finish sums the pieces and writes the activation
    if TRACE:
        t0 = _now(pid)
        t1 = t0
    for v in range(pid, V * has_mlp, G):
        _wait(CNT, 2, M)
        if TRACE:
            t1 = _now(pid)
        it, hi = _share(v, it_c, sh_c)
        while it < hi:
            tile = it // kb_c
            k1 = tl.minimum(kb_c, hi - tile * kb_c)
            g, u = _tile(X2, s_h, WG, s_g, WU, s_u, M, INTER, tile * BN, (it - tile * kb_c) * BK,
                         tl.minimum(k1 * BK, HID), BLOCK_M, EVEN_C, PRECISION, BN, BK, True)  # fmt: skip
            first = _owner(tile * kb_c, it_c, sh_c)
            pieces = _owner(tile * kb_c + kb_c - 1, it_c, sh_c) - first + 1
            last = pieces == 1
            if pieces > 1:  # gate's partial sums in columns [0, INTER) of the slot, up's in [INTER, 2 INTER)
                ptr, mask = _tile_at(PART_C, v - first, M, 2 * INTER, tile * BN, BLOCK_M, BN)
                tl.store(ptr, g, mask=mask)
                ptr, mask = _tile_at(PART_C, v - first, M, 2 * INTER, INTER + tile * BN, BLOCK_M, BN)
                tl.store(ptr, u, mask=mask)
                tl.debug_barrier()
                last = tl.atomic_add(CNT + TICKETS + tile, 1, sem="acq_rel") == pieces - 1
                if last:
                    tl.debug_barrier()
                    g = _sum_tile(PART_C, pieces, M, 2 * INTER, tile * BN, BLOCK_M, BN, UNROLL)
                    u = _sum_tile(PART_C, pieces, M, 2 * INTER, INTER + tile * BN, BLOCK_M, BN, UNROLL)
            if last:
                ptr, mask = _tile_at(ACT, 0, M, INTER, tile * BN, BLOCK_M, BN)
                tl.store(ptr, _gated(g, u, ty, ACT_FN), mask=mask)
                _signal(CNT, 3)
            it = tile * kb_c + k1
    if TRACE:
        _trace(TR, pid, 2, t0, t1, has_mlp)

    # D: the down projection, this program's shares, once every gate/up tile is written
    if TRACE:
        t0 = _now(pid)
        t1 = t0
    for v in range(pid, V * has_mlp, G):
        _wait(CNT, 3, tiles_c)
        if TRACE:
            t1 = _now(pid)
        it, hi = _share(v, it_d, sh_d)
        while it < hi:
            tile = it // kb_d
            k1 = tl.minimum(kb_d, hi - tile * kb_d)
            acc, _ = _tile(ACT, INTER, WD, s_wd, WD, s_wd, M, HID, tile * BN, (it - tile * kb_d) * BK,
                           tl.minimum(k1 * BK, INTER), BLOCK_M, EVEN_D, PRECISION, BN, BK, False)  # fmt: skip
            ptr, mask = _tile_at(PART_D, v - _owner(tile * kb_d, it_d, sh_d), M, HID, tile * BN, BLOCK_M, BN)
            tl.store(ptr, acc, mask=mask)
            it = tile * kb_d + k1
        _signal(CNT, 4)
    if TRACE:
        _trace(TR, pid, 3, t0, t1, has_mlp)

    # E: residual add + the next norm, one row per task (the first layer: the residual starts)
    for row in range(pid, M, G):
        if TRACE:
            t0 = _now(pid)
            t1 = t0
        if has_mlp:
            _wait(CNT, 4, V)
            if TRACE:
                t1 = _now(pid)
            x = _sum_row(PART_D, pd_max, M, HID, row, cols, cmask, kb_d, it_d, sh_d, BLOCK_H, BN, UNROLL)
            out = _norm_row(x.to(ty).to(tl.float32), cols, cmask, HID, eps, R + row * s_h, NW, PM, ty, True, HAS_PM)
        else:
            x = tl.load(H_IN + row * s_h + cols, mask=cmask, other=0.0).to(tl.float32)
            # Gemma's embedding scale (1 elsewhere: exact), rounded as a multiplication in the model's dtype
            x = (x * embed_scale).to(ty).to(tl.float32)
            tl.store(R + row * s_h + cols, x.to(ty), mask=cmask)
            out = _norm_row(x, cols, cmask, HID, eps, R + row * s_h, NW, PM, ty, False, False)
        tl.store(X1 + row * s_h + cols, out, mask=cmask)
        _signal(CNT, 5)
        if TRACE:
            _trace(TR, pid, 4, t0, t1, 1)

    # F: the next layer's Q/K/V; a tile's last piece to finish sums the pieces (and the bias) and writes it
    if TRACE:
        t0 = _now(pid)
        t1 = t0
    for v in range(pid, V * tl.minimum(NQKV, 1), G):
        _wait(CNT, 5, M)
        if TRACE:
            t1 = _now(pid)
        it, hi = _share(v, it_f, sh_f)
        while it < hi:
            tile = it // kb_f
            k1 = tl.minimum(kb_f, hi - tile * kb_f)
            acc, _ = _tile(X1, s_h, WQKV, s_wqkv, WQKV, s_wqkv, M, NQKV, tile * BN, (it - tile * kb_f) * BK,
                           tl.minimum(k1 * BK, HID), BLOCK_M, EVEN_F, PRECISION, BN, BK, False)  # fmt: skip
            first = _owner(tile * kb_f, it_f, sh_f)
            pieces = _owner(tile * kb_f + kb_f - 1, it_f, sh_f) - first + 1
            last = pieces == 1
            if pieces > 1:
                ptr, mask = _tile_at(PART_F, v - first, M, NQKV, tile * BN, BLOCK_M, BN)
                tl.store(ptr, acc, mask=mask)
                tl.debug_barrier()
                last = tl.atomic_add(CNT + tk_f + tile, 1, sem="acq_rel") == pieces - 1
                if last:
                    tl.debug_barrier()
                    acc = _sum_tile(PART_F, pieces, M, NQKV, tile * BN, BLOCK_M, BN, UNROLL)
            if last:
                if HAS_BIAS:
                    rn = tile * BN + tl.arange(0, BN)
                    acc += tl.load(BQKV + rn, mask=rn < NQKV, other=0.0).to(tl.float32)[:, None]
                ptr, mask = _tile_at(QKV, 0, M, NQKV, tile * BN, BLOCK_M, BN)
                tl.store(ptr, acc.to(ty), mask=mask)
            it = tile * kb_f + k1
    if TRACE:
        _trace(TR, pid, 5, t0, t1, NQKV)

    # the last program out zeroes every counter for the next launch
    tl.debug_barrier()
    if tl.atomic_add(CNT + 0, 1, sem="acq_rel") == G - 1:
        i = tl.arange(0, _COUNTERS)
        tl.store(CNT + i, tl.zeros([_COUNTERS], dtype=tl.int32))


@triton.jit
def _trace(TR, pid, phase, start, go, ran):
    """Program ``pid``'s record of a phase it ran: ``[phase, start, wait over, now]``."""
    if ran:
        rec = TR + (pid * 6 + phase) * 4
        tl.store(rec, tl.full([], phase, tl.int64))
        tl.store(rec + 1, start)
        tl.store(rec + 2, go)
        tl.store(rec + 3, _now(pid))


def between_attentions(
    *,
    residual: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    counters: torch.Tensor,
    o: torch.Tensor | None = None,
    o_w: torch.Tensor | None = None,
    ln2: torch.Tensor | None = None,
    gate_up_w: torch.Tensor | None = None,
    down_w: torch.Tensor | None = None,
    post_attn_norm: torch.Tensor | None = None,
    post_mlp_norm: torch.Tensor | None = None,
    activation: str = "silu",
    h_in: torch.Tensor | None = None,
    embed_scale: float | None = None,
    qkv_w: torch.Tensor | None = None,
    qkv_b: torch.Tensor | None = None,
    programs: int | None = None,
    split_target: int | None = None,
    tuning: Tuning | None = None,
    trace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch of the persistent kernel: ``(normed, qkv)``.

    - With ``o`` (the attention's output ``[M, heads * head_dim]``) and the layer's ``o_w``, ``ln2`` (and
      ``post_attn_norm``), ``gate_up_w``, ``down_w``: that layer's output projection and MLP, whose output joins
      ``residual`` (after ``post_mlp_norm`` where given) in place. Without ``o``: ``h_in`` (the embeddings, times
      ``embed_scale`` where given) starts the residual stream, written into ``residual``.
    - ``normed``: the residual stream RMSNormed with ``norm_w`` (the next layer's input norm, or the final norm).
    - ``qkv``: with ``qkv_w`` (and ``qkv_b``), the next layer's fused Q/K/V projection of ``normed``; else None.

    ``post_attn_norm``, ``post_mlp_norm`` and ``qkv_b`` are read only where their phase runs, so a caller may pass a
    step's launches the same ones (the first launch the first layer's norms, the last one the last layer's bias):
    the launches then share one compiled variant.

    ``counters``: int32 ``[COUNTERS]``, zero, owned by the caller (launches on one stream may share it; two at once
    may not). ``programs``: the grid (the SM count by default; one under Triton's interpreter, which runs programs one
    after another). ``split_target``: how many shares each GEMM is cut into (by default ``programs`` on CUDA, and an
    H100's 132 SMs elsewhere: the CPU tests cut the work as the card does). ``tuning``: the launch's :class:`Tuning`
    (:data:`TUNING` by default). ``trace`` (CUDA; ``bench.persistent --trace``): int64 ``[programs, 6, 4]``, filled
    with -1, where program ``p`` writes ``[phase, start, wait over, end]`` (``%globaltimer`` ns) of each phase it
    ran (its last share's, or last row's); ``bench.persistent.phases`` reads it."""
    rows, hid = residual.shape
    if rows > PERSISTENT_ROWS:
        raise ValueError(f"between_attentions takes at most {PERSISTENT_ROWS} rows, got {rows}")
    dev, dt = residual.device, residual.dtype
    tuning = tuning or TUNING
    cuda = dev.type == "cuda"
    if programs is None:
        programs = _sms(dev) * tuning.per_sm if cuda else 1
    shares = split_target or (programs if cuda else 132)
    if shares < programs:
        raise ValueError(f"split_target ({shares}) below the program count ({programs}) would leave programs idle")
    elem = residual.element_size()
    block_k = tuning.block_k * 2 // elem
    block_m = max(16, triton.next_power_of_2(rows))
    has_mlp = o is not None
    tiles_h = triton.cdiv(hid, BLOCK_N)
    x1 = torch.empty(rows, hid, dtype=dt, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    kb_h = triton.cdiv(hid, block_k)
    if has_mlp:
        dq = o.shape[1]
        inter = gate_up_w.shape[0] // 2
        gate, up = gate_up_w[:inter], gate_up_w[inter:]
        pa_max = _max_pieces(tiles_h, triton.cdiv(dq, block_k), shares)
        pc_max = _max_pieces(triton.cdiv(inter, BLOCK_N), kb_h, shares)
        pd_max = _max_pieces(tiles_h, triton.cdiv(inter, block_k), shares)
        part_a = torch.empty(pa_max, rows, hid, **f32)
        part_c = torch.empty(pc_max, rows, 2 * inter, **f32)
        part_d = torch.empty(pd_max, rows, hid, **f32)
        x2 = torch.empty(rows, hid, dtype=dt, device=dev)
        act = torch.empty(rows, inter, dtype=dt, device=dev)
    else:
        dq = inter = 0
        o = o_w = ln2 = gate = up = down_w = part_a = part_c = part_d = x2 = act = x1
        pa_max = pd_max = 1
    has_qkv = qkv_w is not None
    if has_qkv:
        nqkv = qkv_w.shape[0]
        pf_max = _max_pieces(triton.cdiv(nqkv, BLOCK_N), kb_h, shares)
        qkv = torch.empty(rows, nqkv, dtype=dt, device=dev)
        part_f = torch.empty(pf_max, rows, nqkv, **f32) if pf_max > 1 else qkv
    else:
        nqkv = 0
        qkv_w = qkv = part_f = x1
    if TICKETS + triton.cdiv(inter, BLOCK_N) + triton.cdiv(nqkv, BLOCK_N) > COUNTERS:
        raise ValueError(f"between_attentions has {COUNTERS - TICKETS} tickets for gate/up and Q/K/V column tiles")
    h_in = x1 if h_in is None else h_in
    for t in (residual, x1, h_in):
        if t.stride(0) != hid or t.stride(1) != 1:
            raise ValueError("between_attentions reads and writes contiguous [rows, hidden] rows")
    if trace is not None and (not cuda or trace.dtype != torch.int64 or tuple(trace.shape) != (programs, 6, 4)):
        raise ValueError(f"trace: int64 [{programs}, 6, 4] on CUDA")
    stages = tuning.stages
    if cuda:
        stages = max(2, min(stages, _shared(dev) // tuning.per_sm // stage_bytes(tuning, block_m, elem)))
    _between_kernel[(programs,)](
        o, o_w, ln2, post_attn_norm if post_attn_norm is not None else norm_w, gate, up, down_w, part_a, x2, part_c,
        act, part_d, h_in, residual, norm_w, post_mlp_norm if post_mlp_norm is not None else norm_w, x1, qkv_w,
        qkv_b if qkv_b is not None else norm_w, part_f, qkv, counters, trace if trace is not None else counters,
        rows, programs, shares, hid, dq, inter, nqkv, o.stride(0), o_w.stride(0), gate.stride(0), up.stride(0),
        down_w.stride(0), qkv_w.stride(0), hid, pa_max, pd_max,
        float(embed_scale) if embed_scale is not None else 1.0, eps, int(has_mlp),
        HAS_PA=post_attn_norm is not None, HAS_PM=post_mlp_norm is not None, HAS_BIAS=qkv_b is not None,
        ACT_FN=0 if activation == "silu" else 1,
        EVEN_A=dq % block_k == 0 and hid % BLOCK_N == 0, EVEN_C=hid % block_k == 0 and inter % BLOCK_N == 0,
        EVEN_D=inter % block_k == 0 and hid % BLOCK_N == 0, EVEN_F=hid % block_k == 0 and nqkv % BLOCK_N == 0,
        PRECISION="ieee" if dt == torch.float32 else "tf32", BLOCK_M=block_m, BN=BLOCK_N, BK=block_k,
        BLOCK_H=triton.next_power_of_2(hid), UNROLL=tuning.unroll, TRACE=trace is not None, num_warps=4,
        num_stages=stages,
    )  # fmt: skip
    return x1, (qkv if has_qkv else None)


@functools.cache
def _max_pieces(tiles: int, k_blocks: int, shares: int) -> int:
    """The most pieces that a tile of a stream-K phase (``tiles`` column tiles of ``k_blocks`` blocks of K, cut into
    ``shares`` equal shares) is cut into: the slots its partial sums need."""
    iters = tiles * k_blocks
    shares = max(1, min(shares, iters))  # as the kernel cuts them: no share empty

    def owner(it: int) -> int:  # the kernel's _owner
        return ((it + 1) * shares - 1) // iters

    return max(owner(t * k_blocks + k_blocks - 1) - owner(t * k_blocks) + 1 for t in range(tiles)) if iters else 1


def stage_bytes(tuning: Tuning, block_m: int, elem: int) -> int:
    """Shared memory of one pipeline stage: gate's and up's weight blocks and an activation block."""
    return (2 * BLOCK_N + block_m) * (tuning.block_k * 2 // elem) * elem


def new_counters(device: torch.device) -> torch.Tensor:
    """A zeroed counter buffer for :func:`between_attentions` (one per caller that may launch it on its own stream)."""
    return torch.zeros(COUNTERS, dtype=torch.int32, device=device)


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _shared(device: torch.device) -> int:
    """Shared memory one SM gives its programs, less what Triton keeps for itself (bytes)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin - 4096
