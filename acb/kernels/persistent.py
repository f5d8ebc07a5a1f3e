"""A decode step's work between two attentions in one persistent kernel.

Between layer ``i``'s attention and layer ``i + 1``'s, the lean decode step runs eight kernels one op each: output
projection, residual add + norm, gate/up with its activation, down projection (cuBLAS splits it: two kernels), the
next residual add + norm, the fused Q/K/V projection. At 1-3B shapes each kernel pays 2-5 µs of launch, ramp-up and
tail on top of its reading time, about as much as the reading itself (docs/benchmarks.md, issue 16).

:func:`between_attentions` runs all of it as one launch of one program per SM. The work is a list of tasks in the
order the ops come, dealt out round-robin (task ``t`` to program ``t % G``, each program taking its tasks in order):

====  ============================================  ===========================================================
 A    output projection, one column tile and one   partial sums in float32
      split of K per task
 B    one row: residual add + RMSNorm              waits for every A task; sums their partials in split order
 C    gate/up + activation, one column tile        waits for every B task
 D    down projection, one column tile and one     waits for the C tiles that make its split of K
      split of K per task
 E    one row: residual add + RMSNorm (the next    waits for every D task (or reads the embeddings: the first
      layer's input norm, or the final norm)       layer)
 F    next layer's Q/K/V, one column tile and one  waits for every E task; the tile's last split to finish
      split of K per task                          sums the partials in split order (a ticket per tile)
====  ============================================  ===========================================================

A task waits by reading a counter that the tasks it needs increment when done; what it can load before (a norm row's
residual row and weights) it loads first. Every task waits only for tasks listed before it, and every program takes
its tasks in list order, so the smallest unfinished task never waits for anything unfinished: no deadlock, as long
as all G programs can be resident at once (G = the SM count, one program per SM). Other work on the GPU only delays
programs that are not resident yet, with one exception: two of these kernels running at once (two engines on streams
of their own in one process, or two processes sharing the GPU through MPS) can each hold SMs that the other's
waiting programs need. acb launches on the current stream, so engines in one process take turns unless their caller
gives them streams. The lean model uses this kernel only with ``ACB_PERSISTENT=1``: with each wait's acquire in place
it was 0-4 % slower per layer than the per-op kernels (H200, session 20, docs/benchmarks.md).

The partial sums are added in a fixed order whoever finishes last, so results do not depend on timing. The last
program to finish zeroes the counters for the next launch (a CUDA graph replays it as it is).

The arithmetic is the per-op path's: products accumulated in float32 and rounded once to the model's dtype (a
GEMM's output), norms as :func:`acb.kernels.fused.add_rmsnorm` computes them (the same code), the activation as
:func:`acb.kernels.fused.gate_up_act`'s.

Under Triton's interpreter (the CPU tests) the grid is one program, which runs every task in order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fused import _gated, _norm_inputs, _norm_row, _norm_values

__all__ = ["between_attentions", "new_counters", "one_round", "PERSISTENT_ROWS", "COUNTERS", "Tuning", "TUNING"]

# Steps of at most this many rows (decode steps); more rows are compute-bound, where cuBLAS's wide tiles belong.
PERSISTENT_ROWS = 64

# The counters, int32: [0] programs done, [1] A tasks done, [2] B, [3] D, [4] E, [C_CHUNKS + s] C tiles done in
# the down projection's split s, [F_TICKETS + tile] the F splits of a column tile done.
MAX_SPLITS = 64
COUNTERS = 2048  # F_TICKETS + the Q/K/V column tiles, at most
MAX_QKV_TILES = COUNTERS - 8 - MAX_SPLITS
C_CHUNKS: tl.constexpr = tl.constexpr(8)
F_TICKETS: tl.constexpr = tl.constexpr(8 + MAX_SPLITS)
_COUNTERS: tl.constexpr = tl.constexpr(COUNTERS)

BLOCK_N = 64  # weight rows (output columns) per tile


@dataclass(frozen=True)
class Tuning:
    """How the kernel is launched (``python -m bench.persistent --sweep`` times the choices)."""

    block_k: int = 128  # K per tile for 2-byte weights; 4-byte ones take half (the same bytes)
    stages: int = 5  # gate/up tile pairs in flight per program (Triton's software pipeline)
    stages_one: int = 5  # tiles in flight in the other GEMMs' loops (one weight tile per stage, not two)
    per_sm: int = 1  # programs per SM (all must be resident at once)
    unroll: int = 4  # partial sums loaded this many splits at a time


TUNING = Tuning()


@triton.jit
def _wait(CNT, idx, target):
    """Spin until counter ``idx`` reaches ``target``; then this program's reads see what those tasks wrote. The spin
    reads relaxed; an acquiring add ends it, its result compared so that it stays: Triton 3.6 (the card's) deletes
    an atomic whose result is unused, and with it the acquire that orders the reads after the others' writes."""
    while tl.load(CNT + idx, volatile=True) < target:
        pass
    while tl.atomic_add(CNT + idx, 0, sem="acquire") < target:  # runs once: the count only grows
        pass
    tl.debug_barrier()


@triton.jit
def _now(dummy):
    """The GPU's global nanosecond timer (for ``trace``)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64, is_pure=False,
                                     pack=1)  # fmt: skip


@triton.jit
def _signal(CNT, idx):
    """This task's writes are done: count it."""
    tl.debug_barrier()  # every thread's stores are issued before the (one) atomic releases them
    tl.atomic_add(CNT + idx, 1, sem="release")


@triton.jit
def _tile(X, s_x, W, s_w, U, s_u, M, N, n0, k_lo, k_hi, BLOCK_M: tl.constexpr, EVEN: tl.constexpr,
          PRECISION: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TWO: tl.constexpr,
          STAGES: tl.constexpr):  # fmt: skip
    """``acc[n, m] = sum_k W[n0 + n, k] X[m, k]`` over ``k_lo <= k < k_hi`` (float32 ``[BN, BLOCK_M]``): the
    weights on the tensor cores' M side, which a few rows would leave mostly empty. ``k_lo`` is a multiple of BK.
    Returns ``(acc, acc_u)``: with ``TWO``, ``acc_u`` is the same product of ``U`` (gate and up in one loop), else
    zeros. STAGES: the loop's pipeline depth."""
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    xp = X + rm[:, None] * s_x + (k_lo + rk)[None, :]
    wp = W + rn[:, None].to(tl.int64) * s_w + (k_lo + rk)[None, :]
    up = U + rn[:, None].to(tl.int64) * s_u + (k_lo + rk)[None, :]
    rows = rm[:, None] < M
    acc = tl.zeros((BN, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BN, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
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
    ``s`` of ``P [slices, M, N]``: a split's partial sums, or (slice 0) an output ``[M, N]``."""
    rm = tl.arange(0, BLOCK_M)[None, :]
    rn = n0 + tl.arange(0, BN)[:, None]
    return P + (s * M + rm) * N + rn, (rm < M) & (rn < N)


@triton.jit
def _store_partial(P, s, acc, M, N, n0, BLOCK_M: tl.constexpr, BN: tl.constexpr):
    """Split ``s``'s partial tile into ``P [splits, M, N]`` (float32)."""
    ptr, mask = _tile_at(P, s, M, N, n0, BLOCK_M, BN)
    tl.store(ptr, acc, mask=mask)


@triton.jit
def _sum_row(P, splits, M, N, row, cols, mask, BLOCK_H: tl.constexpr, UNROLL: tl.constexpr):
    """Row ``row`` of ``P [splits, M, N]`` summed over the splits in order (float32), UNROLL splits' loads in
    flight at a time."""
    x = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s0 in range(0, splits, UNROLL):
        for i in tl.static_range(UNROLL):
            x += tl.load(P + ((s0 + i) * M + row) * N + cols, mask=mask & (cols * 0 + s0 + i < splits), other=0.0,
                         cache_modifier=".cg")  # fmt: skip
    return x


@triton.jit(do_not_specialize=["M", "G", "S_A", "S_D", "S_F", "ka_blocks", "kd_blocks", "kf_blocks", "has_mlp", "NQKV"])
def _between_kernel(
    ATT, WO, LN2, PA, WG, WU, WD, PART_A, X2, ACT, PART_D,
    H_IN, R, NW, PM, X1, WQKV, BQKV, PART_F, QKV, CNT,
    M, G, HID, DQ, INTER, NQKV, s_o, s_wo, s_g, s_u, s_wd, s_wqkv, s_h,
    S_A, S_D, S_F, ka_blocks, kd_blocks, kf_blocks, embed_scale, eps, has_mlp,
    HAS_PA: tl.constexpr, HAS_PM: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_FN: tl.constexpr,
    EVEN_A: tl.constexpr, EVEN_C: tl.constexpr, EVEN_D: tl.constexpr, EVEN_F: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_H: tl.constexpr,
    STAGES_C: tl.constexpr, STAGES_1: tl.constexpr, UNROLL: tl.constexpr, TR, TRACE: tl.constexpr,
    MAX_TRACE: tl.constexpr,
):  # fmt: skip
    # One compiled variant serves a step's first launch (has_mlp 0: no A-D tasks), its middle ones and its last
    # (NQKV 0: no F tasks): the flags that tell them apart are run-time values.
    pid = tl.program_id(0)
    ty = X1.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)  # a row of the hidden size, for the norms
    cmask = cols < HID
    n_tiles_h = tl.cdiv(HID, BN)
    n_a = n_tiles_h * S_A
    n_c = tl.cdiv(INTER, BN)
    n_d = n_tiles_h * S_D
    kd_span = kd_blocks * BK
    end_a = n_a * has_mlp
    end_b = end_a + M * has_mlp
    end_c = end_b + n_c * has_mlp
    end_d = end_c + n_d * has_mlp
    end_e = end_d + M
    total = end_e + tl.cdiv(NQKV, BN) * S_F
    for t in range(pid, total, G):
        if TRACE:
            t_start = _now(pid)
        t_go = t_start if TRACE else 0  # when the task's wait ended (trace)
        if t < end_a:  # A: the output projection, one tile of one split
            tile = t // S_A
            s = t % S_A
            k_lo = s * ka_blocks * BK
            k_hi = tl.minimum(k_lo + ka_blocks * BK, DQ)
            acc, _ = _tile(ATT, s_o, WO, s_wo, WO, s_wo, M, HID, tile * BN, k_lo, k_hi, BLOCK_M, EVEN_A, PRECISION,
                           BN, BK, False, STAGES_1)  # fmt: skip
            _store_partial(PART_A, s, acc, M, HID, tile * BN, BLOCK_M, BN)
            _signal(CNT, 1)
        elif t < end_b:  # B: one row's residual add + the norm before the MLP
            row = t - end_a
            # what does not wait: the residual row (the previous launch wrote it) and the norms' weights
            r, w, p = _norm_inputs(R + row * s_h, LN2, PA, cols, cmask, True, HAS_PA)
            _wait(CNT, 1, n_a)
            if TRACE:
                t_go = _now(pid)
            x = _sum_row(PART_A, S_A, M, HID, row, cols, cmask, BLOCK_H, UNROLL).to(ty).to(tl.float32)
            out = _norm_values(x, r, w, p, cols, cmask, HID, eps, R + row * s_h, ty, True, HAS_PA)
            tl.store(X2 + row * s_h + cols, out, mask=cmask)
            _signal(CNT, 2)
        elif t < end_c:  # C: gate/up and the activation, one tile of the intermediate columns
            tile = t - end_b
            _wait(CNT, 2, M)
            if TRACE:
                t_go = _now(pid)
            g, u = _tile(X2, s_h, WG, s_g, WU, s_u, M, INTER, tile * BN, 0, HID, BLOCK_M, EVEN_C, PRECISION, BN, BK,
                         True, STAGES_C)  # fmt: skip
            ptr, mask = _tile_at(ACT, 0, M, INTER, tile * BN, BLOCK_M, BN)
            tl.store(ptr, _gated(g, u, ty, ACT_FN), mask=mask)
            _signal(CNT, C_CHUNKS + tile * BN // kd_span)
        elif t < end_d:  # D: the down projection, one tile of one split, once its split of C is done
            tile = (t - end_c) // S_D
            s = (t - end_c) % S_D
            k_lo = s * kd_span
            k_hi = tl.minimum(k_lo + kd_span, INTER)
            _wait(CNT, C_CHUNKS + s, tl.cdiv(k_hi - k_lo, BN))
            if TRACE:
                t_go = _now(pid)
            acc, _ = _tile(ACT, INTER, WD, s_wd, WD, s_wd, M, HID, tile * BN, k_lo, k_hi, BLOCK_M, EVEN_D, PRECISION,
                           BN, BK, False, STAGES_1)  # fmt: skip
            _store_partial(PART_D, s, acc, M, HID, tile * BN, BLOCK_M, BN)
            _signal(CNT, 3)
        elif t < end_e:  # E: one row's residual add + the next norm (the first layer: the residual starts)
            row = t - end_d
            if has_mlp:
                _wait(CNT, 2, M)  # B's residual rows (long done), then what does not wait for D
                r, w, p = _norm_inputs(R + row * s_h, NW, PM, cols, cmask, True, HAS_PM)
                _wait(CNT, 3, n_d)
                if TRACE:
                    t_go = _now(pid)
                x = _sum_row(PART_D, S_D, M, HID, row, cols, cmask, BLOCK_H, UNROLL).to(ty).to(tl.float32)
                out = _norm_values(x, r, w, p, cols, cmask, HID, eps, R + row * s_h, ty, True, HAS_PM)
            else:
                x = tl.load(H_IN + row * s_h + cols, mask=cmask, other=0.0).to(tl.float32)
                # Gemma's embedding scale (1 elsewhere: exact), rounded as a multiplication in the model's dtype
                x = (x * embed_scale).to(ty).to(tl.float32)
                tl.store(R + row * s_h + cols, x.to(ty), mask=cmask)
                out = _norm_row(x, cols, cmask, HID, eps, R + row * s_h, NW, PM, ty, False, False)
            tl.store(X1 + row * s_h + cols, out, mask=cmask)
            _signal(CNT, 4)
        else:  # F: the next layer's Q/K/V, one tile of one split; the tile's last split writes it
            tile = (t - end_e) // S_F
            s = (t - end_e) % S_F
            k_lo = s * kf_blocks * BK
            k_hi = tl.minimum(k_lo + kf_blocks * BK, HID)
            _wait(CNT, 4, M)
            if TRACE:
                t_go = _now(pid)
            acc, _ = _tile(X1, s_h, WQKV, s_wqkv, WQKV, s_wqkv, M, NQKV, tile * BN, k_lo, k_hi, BLOCK_M, EVEN_F,
                           PRECISION, BN, BK, False, STAGES_1)  # fmt: skip
            last = S_F == 1
            if S_F > 1:
                _store_partial(PART_F, s, acc, M, NQKV, tile * BN, BLOCK_M, BN)
                tl.debug_barrier()
                last = tl.atomic_add(CNT + F_TICKETS + tile, 1, sem="acq_rel") == S_F - 1
                if last:
                    tl.debug_barrier()
                    acc = tl.zeros((BN, BLOCK_M), dtype=tl.float32)
                    for s0 in range(0, S_F, UNROLL):
                        for i in tl.static_range(UNROLL):
                            ptr, mask = _tile_at(PART_F, s0 + i, M, NQKV, tile * BN, BLOCK_M, BN)
                            acc += tl.load(
                                ptr,
                                mask=mask & (tl.full(mask.shape, s0 + i, tl.int32) < S_F),
                                other=0.0,
                                cache_modifier=".cg",
                            )
            if last:
                if HAS_BIAS:
                    rn = tile * BN + tl.arange(0, BN)
                    acc += tl.load(BQKV + rn, mask=rn < NQKV, other=0.0).to(tl.float32)[:, None]
                ptr, mask = _tile_at(QKV, 0, M, NQKV, tile * BN, BLOCK_M, BN)
                tl.store(ptr, acc.to(ty), mask=mask)
        if TRACE:  # [task, start, wait over, end] of this program's (t - pid) // G-th task
            rec = TR + ((pid * MAX_TRACE + (t - pid) // G) * 4).to(tl.int64)
            tl.store(rec, t.to(tl.int64))
            tl.store(rec + 1, t_start)
            tl.store(rec + 2, t_go)
            tl.store(rec + 3, _now(pid))
    # the last program out zeroes every counter for the next launch
    tl.debug_barrier()
    if tl.atomic_add(CNT + 0, 1, sem="acq_rel") == G - 1:
        i = tl.arange(0, _COUNTERS)
        tl.store(CNT + i, tl.zeros([_COUNTERS], dtype=tl.int32))


def _splits(tiles: int, k: int, block_k: int, programs: int) -> tuple[int, int]:
    """``(splits, blocks per split)`` of a K of ``k`` for ``tiles`` column tiles: enough splits to give every
    program about one task, none shorter than two blocks.

    (A model of each split's waves of tasks, which split phi3-mini's and mistral-3b's Q/K/V and down projections
    finer to fill the second wave, made their layers 4-9 % slower on an H200: session 17, call 4.)"""
    k_blocks = triton.cdiv(k, block_k)
    want = max(1, min(MAX_SPLITS, programs // max(1, tiles), k_blocks // 2))
    per = triton.cdiv(k_blocks, want)
    return triton.cdiv(k_blocks, per), per


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
    after another). ``split_target``: the program count that the splits of K are sized for (by default
    ``programs`` on CUDA, and an H100's 132 SMs elsewhere: the CPU tests split the work as the card does).
    ``tuning``: the launch's :class:`Tuning` (:data:`TUNING` by default). ``trace`` (CUDA; ``bench.persistent
    --trace``): int64 ``[programs, tasks, 4]``, where program ``p`` writes its ``j``-th task's
    ``[task, start, wait over, end]`` in ``%globaltimer`` nanoseconds (``bench.persistent.phases`` reads it)."""
    rows, hid = residual.shape
    if rows > PERSISTENT_ROWS:
        raise ValueError(f"between_attentions takes at most {PERSISTENT_ROWS} rows, got {rows}")
    dev, dt = residual.device, residual.dtype
    tuning = tuning or TUNING
    cuda = dev.type == "cuda"
    if programs is None:
        programs = _sms(dev) * tuning.per_sm if cuda else 1
    target = split_target or (programs if cuda else 132)
    elem = residual.element_size()
    block_k = tuning.block_k * 2 // elem
    block_m = max(16, triton.next_power_of_2(rows))
    has_mlp = o is not None
    tiles_h = triton.cdiv(hid, BLOCK_N)
    x1 = torch.empty(rows, hid, dtype=dt, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    if has_mlp:
        dq = o.shape[1]
        inter = gate_up_w.shape[0] // 2
        gate, up = gate_up_w[:inter], gate_up_w[inter:]
        s_a, ka = _splits(tiles_h, dq, block_k, target)
        s_d, kd = _splits(tiles_h, inter, block_k, target)
        part_a = torch.empty(s_a, rows, hid, **f32)
        part_d = torch.empty(s_d, rows, hid, **f32)
        x2 = torch.empty(rows, hid, dtype=dt, device=dev)
        act = torch.empty(rows, inter, dtype=dt, device=dev)
    else:
        dq = inter = 0
        o = o_w = ln2 = gate = up = down_w = part_a = part_d = x2 = act = x1
        s_a = s_d = ka = kd = 1
    has_qkv = qkv_w is not None
    if has_qkv:
        nqkv = qkv_w.shape[0]
        s_f, kf = _splits(triton.cdiv(nqkv, BLOCK_N), hid, block_k, target)
        if triton.cdiv(nqkv, BLOCK_N) > MAX_QKV_TILES:
            raise ValueError(f"between_attentions has tickets for {MAX_QKV_TILES} Q/K/V column tiles")
        qkv = torch.empty(rows, nqkv, dtype=dt, device=dev)
        part_f = torch.empty(s_f, rows, nqkv, **f32) if s_f > 1 else qkv
    else:
        nqkv, s_f, kf = 0, 1, 1
        qkv_w = qkv = part_f = x1
    h_in = x1 if h_in is None else h_in
    for t in (residual, x1, h_in):
        if t.stride(0) != hid or t.stride(1) != 1:
            raise ValueError("between_attentions reads and writes contiguous [rows, hidden] rows")
    if trace is not None and (not cuda or trace.dtype != torch.int64 or trace.shape[0] < programs):
        raise ValueError("trace: int64 [programs, tasks, 4] on CUDA")
    stages_c, stages_1 = tuning.stages, tuning.stages_one
    if cuda:  # each loop's stages in the shared memory (Triton gives the loops the same memory one after another)
        fits = _shared(dev) // tuning.per_sm
        stages_c = max(2, min(stages_c, fits // stage_bytes(tuning, block_m, elem, 2)))
        stages_1 = max(2, min(stages_1, fits // stage_bytes(tuning, block_m, elem, 1)))
    _between_kernel[(programs,)](
        o, o_w, ln2, post_attn_norm if post_attn_norm is not None else norm_w, gate, up, down_w, part_a, x2, act,
        part_d, h_in, residual, norm_w, post_mlp_norm if post_mlp_norm is not None else norm_w, x1, qkv_w,
        qkv_b if qkv_b is not None else norm_w, part_f, qkv, counters,
        rows, programs, hid, dq, inter, nqkv, o.stride(0), o_w.stride(0), gate.stride(0), up.stride(0),
        down_w.stride(0), qkv_w.stride(0), hid, s_a, s_d, s_f, ka, kd, kf,
        float(embed_scale) if embed_scale is not None else 1.0, eps, int(has_mlp),
        HAS_PA=post_attn_norm is not None, HAS_PM=post_mlp_norm is not None, HAS_BIAS=qkv_b is not None,
        ACT_FN=0 if activation == "silu" else 1,
        EVEN_A=dq % block_k == 0 and hid % BLOCK_N == 0, EVEN_C=hid % block_k == 0 and inter % BLOCK_N == 0,
        EVEN_D=inter % block_k == 0 and hid % BLOCK_N == 0, EVEN_F=hid % block_k == 0 and nqkv % BLOCK_N == 0,
        PRECISION="ieee" if dt == torch.float32 else "tf32", BLOCK_M=block_m, BN=BLOCK_N, BK=block_k,
        BLOCK_H=triton.next_power_of_2(hid), STAGES_C=stages_c, STAGES_1=stages_1, UNROLL=tuning.unroll,
        TR=trace if trace is not None else counters, TRACE=trace is not None,
        MAX_TRACE=trace.shape[1] if trace is not None else 1, num_warps=4,
    )  # fmt: skip
    return x1, (qkv if has_qkv else None)


def stage_bytes(tuning: Tuning, block_m: int, elem: int, weights: int) -> int:
    """Shared memory of one pipeline stage of a loop over ``weights`` weight tiles (gate/up: 2) and an activation
    tile."""
    return (weights * BLOCK_N + block_m) * (tuning.block_k * 2 // elem) * elem


def one_round(hidden: int, intermediate: int, qkv_rows: int, programs: int) -> bool:
    """Whether every GEMM of the kernel has at most one column tile per program, so that no phase takes a second
    round of tasks while most programs wait. Where one does, the lean path keeps the per-op kernels: phi3-mini's 144
    Q/K/V tiles on an H200's 132 SMs made the kernel 5-9 % slower per layer than those (sessions 17 and 18);
    qwen2.5-1.5b's 140 gate/up tiles 1-5 % slower in session 18, 3 % faster in session 17 (docs/benchmarks.md)."""
    return max(triton.cdiv(n, BLOCK_N) for n in (hidden, intermediate, qkv_rows)) <= programs


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
