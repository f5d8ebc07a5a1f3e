"""``x @ w.T (+ bias)`` for the few rows of a decode step, in one kernel whatever its split over K: ``bench.gemm``'s
candidate against cuBLAS. Not used by the engine: on an H200 it ties cuBLAS at <= 64 rows and loses by 15-45 % at
128 (docs/benchmarks.md, "A split-K projection in one kernel"), so it stays here until a table says otherwise.

A decode step's projections read every weight once for at most a few hundred rows: they are bound by memory, and a
tile over all of K leaves most SMs idle when N is small (llama-8b's O and down projections have 4,096 columns:
32 tiles of 128). So the programs split K as well, and each writes its float32 partial tile to a workspace. The
last program of a column tile to finish (a ticket per tile, taken with an atomic add) sums the partials in split
order, adds the bias, rounds once and writes the result: no zeroing kernel, no reduce kernel, and the same sum
whichever program arrives last, so results do not depend on timing. The tickets reset themselves, so a CUDA graph
can replay the kernel.

Tickets live in one buffer per device, shared by every call: two of these kernels must not run at once on one
device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["skinny_linear", "LINEAR_ROWS", "Config"]

# At most this many rows: a decode step's (prompt steps are compute-bound, where cuBLAS's large tiles belong).
LINEAR_ROWS = 128
_TICKETS = 8192  # column tiles one call may have: N / BLOCK_N

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, SWAP). SWAP computes (W @ X^T)^T, so that the weights' columns
# fill the tensor cores' M side when there are fewer rows than the 64 a Hopper warpgroup multiplies at once.
Config = tuple[int, int, int, int, int, bool]


@triton.jit(do_not_specialize=["M", "k_blocks"])  # any row count and split, one compiled variant per tile
def _linear_kernel(
    X, W, BIAS, Y, P, TICKETS, M, N, K, k_blocks, split_k, s_xm, s_wn, s_ym, s_pk,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``Y[:, n] = X @ W[n] (+ BIAS[n])`` for this program's BLOCK_N columns n, over K from ``pid_k * k_per`` to
    ``(pid_k + 1) * k_per``, ``k_per = k_blocks * BLOCK_K``. With SPLIT the partial goes to ``P + pid_k * s_pk``
    and the tile's last program sums them all into Y. Offsets along K are multiples of BLOCK_K and ``s_pk`` one of
    16 so that Triton knows the loads and stores are aligned (vector loads, async copies)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per = k_blocks * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    rk = k_lo + tl.arange(0, BLOCK_K)
    xp = X + rm[:, None] * s_xm + rk[None, :]
    wp = W + rn[:, None].to(tl.int64) * s_wn + rk[None, :]
    rows = rm[:, None] < M
    cols = rn[:, None] < N
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN:  # K a multiple of BLOCK_K and N of BLOCK_N: only the rows are masked
            x = tl.load(xp, mask=rows, other=0.0)
            w = tl.load(wp)
        else:
            ks = (k0 - k_lo + rk)[None, :] < K
            x = tl.load(xp, mask=rows & ks, other=0.0)
            w = tl.load(wp, mask=cols & ks, other=0.0)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        xp += BLOCK_K
        wp += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    out_mask = rows & (rn[None, :] < N)
    tile = rm[:, None] * N + rn[None, :]  # a partial tile's place in P[pid_k], [M, N] row-major
    last = True
    if SPLIT:
        tl.store(P + pid_k * s_pk + tile, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket says so
        last = tl.atomic_add(TICKETS + pid_n, 1, sem="acq_rel") == split_k - 1
        if last:
            tl.debug_barrier()  # (the ticket came to one thread) every thread reads after the acquire
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, split_k):  # in split order, whoever came last
                acc += tl.load(P + s * s_pk + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(TICKETS + pid_n, 0)  # ready for the next call (or graph replay)
    if last:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * s_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=out_mask)


def skinny_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, config: Config | None = None
) -> torch.Tensor:
    """``x @ w.T (+ bias)`` in ``x``'s dtype, for at most :data:`LINEAR_ROWS` rows of ``x [M, K]`` and weights
    ``w [N, K]`` whose rows are contiguous; ``config`` overrides :func:`pick`'s tile and split."""
    rows, k = x.shape
    n = w.shape[0]
    if rows > LINEAR_ROWS:
        raise ValueError(f"skinny_linear takes at most {LINEAR_ROWS} rows, got {rows}")
    if w.stride(-1) != 1 or w.shape[1] != k:
        raise ValueError(f"skinny_linear needs weights [N, {k}] with contiguous rows, got {tuple(w.shape)}")
    block_m = max(16, triton.next_power_of_2(rows))
    sms = _sms(x.device) if x.is_cuda else 132
    block_n, block_k, split_k, warps, stages, swap = config or pick(rows, n, k, sms)
    block_k = block_k * 2 // x.element_size()  # 4-byte weights: half the K per tile, the same bytes
    tiles = triton.cdiv(n, block_n)
    if tiles > _TICKETS:
        raise ValueError(f"skinny_linear has tickets for {_TICKETS} column tiles, {n} columns need {tiles}")
    k_blocks = triton.cdiv(triton.cdiv(k, block_k), split_k)
    split_k = triton.cdiv(k, k_blocks * block_k)  # no empty split
    s_pk = triton.cdiv(rows * n, 16) * 16
    x = x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    partials = torch.empty(split_k, s_pk, dtype=torch.float32, device=x.device) if split_k > 1 else out
    _linear_kernel[(tiles, split_k)](
        x, w, bias if bias is not None else out, out, partials, _tickets(x.device), rows, n, k, k_blocks, split_k,
        x.stride(0), w.stride(0), out.stride(0), s_pk,
        HAS_BIAS=bias is not None, SPLIT=split_k > 1, SWAP=swap, EVEN=k % block_k == 0 and n % block_n == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def pick(rows: int, n: int, k: int, sms: int) -> Config:
    """The tile and split for ``rows`` x ``[n, k]`` on a device of ``sms`` SMs: 128 columns per tile, and enough
    splits of K to give about every SM one program."""
    block_n = 128 if rows > 64 else 64
    tiles = triton.cdiv(n, block_n)
    split_k = max(1, min(8, sms // tiles, k // 512))
    if rows > 64:
        return (block_n, 64, split_k, 8, 4, False)
    return (block_n, 128, split_k, 4, 4, rows <= 32)


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _tickets(device: torch.device) -> torch.Tensor:
    """The per-tile tickets of every call on ``device``, zero between calls (each call's last programs reset theirs)."""
    return torch.zeros(_TICKETS, dtype=torch.int32, device=device)
