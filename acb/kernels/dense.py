"""The decode GEMM: ``y = x @ w.T (+ b)`` for a decode step's few rows, in Triton, under programmatic dependent
launch (PDL).

At a few rows a projection is memory-bound: it reads its weight once. A layer's kernels run back to back and
each pays a launch, a ramp-up and a tail during which the memory bus idles. Launched with PDL (Hopper and later),
this kernel may start while its predecessor still runs: it loads its first weight tile (no step writes weights)
and only then waits for its input. bench/chain.py measured the trade (docs/benchmarks.md): a layer chain of these
is 5 % faster than cuBLAS's at tensor-parallel shapes (llama-8b at TP=2) and no faster at one GPU's, so the lean
model takes it where it won (:func:`acb.lean_model.decode_gemm_choice`).

The PDL protocol of the decode step's kernels (this one, :mod:`acb.kernels.fused`'s norm and SiLU·mul, the one-shot
all-reduce + norm): a kernel launched with PDL reads and writes nothing an earlier kernel may touch before its
``gdc_wait`` — only constant weights — and every program calls ``gdc_wait``; each calls
``gdc_launch_dependents`` right after it. So a kernel completes only after its predecessor did, completion stays
ordered down the chain, and when a kernel starts early every kernel but its immediate predecessor is done. Kernels
launched without PDL (cuBLAS, attention, torch's) start after their predecessor completes, as always.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["linear", "MAX_ROWS"]

MAX_ROWS = 64
"""Most rows this kernel takes; more go to cuBLAS (at 128+ rows a projection turns compute-bound)."""


@triton.jit
def _dense_kernel(
    X, W, B, Y, M, N, K, s_x, s_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program: all M rows (padded to BLOCK_M) times BLOCK_N columns of ``W [N, K]``, over the whole of K."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm[:, None] < M
    nm = rn[:, None] < N
    w_ptr = W + rn[:, None].to(tl.int64) * K + rk[None, :]
    x_ptr = X + rm[:, None] * s_x + rk[None, :]
    if EVEN_K:
        w = tl.load(w_ptr, mask=nm, other=0.0)  # the first weight tile: no earlier kernel writes it
    else:
        w = tl.load(w_ptr, mask=nm & (rk[None, :] < K), other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the predecessor (which wrote X) has completed
        tl.extra.cuda.gdc_launch_dependents()
    if EVEN_K:
        x = tl.load(x_ptr, mask=mm, other=0.0)
    else:
        x = tl.load(x_ptr, mask=mm & (rk[None, :] < K), other=0.0)
    if IEEE:  # float32 models: exact products, as cuBLAS without TF32
        acc = tl.dot(x, tl.trans(w), input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w))
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + k0, mask=mm, other=0.0)
            w = tl.load(w_ptr + k0, mask=nm, other=0.0)
        else:
            km = (k0 + rk[None, :]) < K
            x = tl.load(x_ptr + k0, mask=mm & km, other=0.0)
            w = tl.load(w_ptr + k0, mask=nm & km, other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * s_y + rn[None, :], acc.to(Y.dtype.element_ty), mask=mm & (rn[None, :] < N))


def _config(n: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)``: what bench/chain.py picked on an H100 for llama-8b's
    projections — narrow, deep tiles where N is small (Q/K/V, O, down: 96-128 programs on 132 SMs), wider
    ones where N is large (gate/up)."""
    return (64, 128, 4, 4) if n >= 8192 else (32, 256, 4, 4)


def linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, pdl: bool = False, out=None
) -> torch.Tensor:
    """``F.linear(x, w, b)`` (into ``out`` when given) with this kernel for up to :data:`MAX_ROWS` rows of a
    16-bit or float32 ``x`` on CUDA; anything else goes to cuBLAS. ``pdl``: launch with programmatic dependent
    launch (the module docstring's protocol; Hopper and later)."""
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_ROWS or m == 0 or x.stride(1) != 1 or not w.is_contiguous() or w.dtype != x.dtype:
        if out is None:
            return F.linear(x, w, b)
        torch.matmul(x, w.t(), out=out)
        return out if b is None else out.add_(b)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    block_m = max(16, triton.next_power_of_2(m))
    block_n, block_k, warps, stages = _config(n)
    if x.dtype == torch.float32:  # twice the bytes per tile: shallower tiles fit the shared memory
        block_k, stages = min(block_k, 64), 3
    elif block_m == 64:
        stages = 3
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    _dense_kernel[(triton.cdiv(n, block_n),)](
        x, w, b if b is not None else w, y, m, n, k, x.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, BIAS=b is not None,
        IEEE=x.dtype == torch.float32, PDL=pdl, num_warps=warps, num_stages=stages,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return y
