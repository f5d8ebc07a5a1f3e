"""Small fused kernels of the lean model path: rotary embedding folded into the KV-cache write, residual add +
RMSNorm (after a norm of its own where Gemma 3 has one), SiLU·mul, and the gate/up projection with its activation
for the few rows of a decode step. Each replaces several kernels (and their round trips through memory). Also the
decode graphs' greedy argmax, and transformers' rotate-half rotary in one kernel, both for the generic path too."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import pdl_launch

__all__ = [
    "rope_and_cache",
    "add_rmsnorm",
    "silu_mul",
    "gate_up_act",
    "GATE_UP_ROWS",
    "argmax_rows",
    "argmax_into",
    "rotary",
    "rotary_fits",
]


@triton.jit
def _rope_cache_kernel(
    Q, K, V, COS, SIN, POS, SLOT, KC, VC,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cos, s_cs, s_ch,
    H: tl.constexpr, H_PAD: tl.constexpr, HKV: tl.constexpr, HKV_PAD: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    slot = tl.load(SLOT + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)  # half the head_dim, padded to a power of two (Phi-3's 48)
    im = i[None, :] < HALF
    c = tl.load(COS + pos * s_cos + i, mask=i < HALF, other=0.0)[None, :]
    s = tl.load(SIN + pos * s_cos + i, mask=i < HALF, other=0.0)[None, :]
    hq = tl.arange(0, H_PAD)[:, None]
    qm = (hq < H) & im
    q_ptr = Q + t * s_qt + hq * s_qh + i[None, :]
    x1 = tl.load(q_ptr, mask=qm, other=0.0).to(tl.float32)
    x2 = tl.load(q_ptr + HALF, mask=qm, other=0.0).to(tl.float32)
    tl.store(q_ptr, (x1 * c - x2 * s).to(Q.dtype.element_ty), mask=qm)
    tl.store(q_ptr + HALF, (x2 * c + x1 * s).to(Q.dtype.element_ty), mask=qm)
    hk = tl.arange(0, HKV_PAD)[:, None]
    km = (hk < HKV) & im
    k_ptr = K + t * s_kt + hk * s_kh + i[None, :]
    y1 = tl.load(k_ptr, mask=km, other=0.0).to(tl.float32)
    y2 = tl.load(k_ptr + HALF, mask=km, other=0.0).to(tl.float32)
    cache = slot * s_cs + hk * s_ch + i[None, :]
    tl.store(KC + cache, (y1 * c - y2 * s).to(KC.dtype.element_ty), mask=km)
    tl.store(KC + cache + HALF, (y2 * c + y1 * s).to(KC.dtype.element_ty), mask=km)
    v_ptr = V + t * s_vt + hk * s_vh + i[None, :]
    tl.store(VC + cache, tl.load(v_ptr, mask=km, other=0.0).to(VC.dtype.element_ty), mask=km)
    tl.store(VC + cache + HALF, tl.load(v_ptr + HALF, mask=km, other=0.0).to(VC.dtype.element_ty), mask=km)


def rope_and_cache(
    q: torch.Tensor,  # [T, H, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [max_pos, D // 2] fp32
    sin: torch.Tensor,
    positions: torch.Tensor,  # [T]
    slot_mapping: torch.Tensor,  # [T]
    kv: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
) -> None:
    """Apply rotary embedding (rotate-half convention) to q and k; write rotated k and v to their cache slots."""
    tokens, heads, dim = q.shape
    kvh = k.shape[1]
    kc = kv[0].view(-1, kvh, dim)
    vc = kv[1].view(-1, kvh, dim)
    _rope_cache_kernel[(tokens,)](
        q, k, v, cos, sin, positions, slot_mapping, kc, vc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kc.stride(0), kc.stride(1),
        H=heads, H_PAD=triton.next_power_of_2(heads), HKV=kvh, HKV_PAD=triton.next_power_of_2(kvh), HALF=dim // 2,
        HALF_PAD=triton.next_power_of_2(dim // 2), num_warps=4,
    )  # fmt: skip


@triton.jit
def _rotary_rows(X, OUT, t, s_xt, s_xh, s_ot, s_oh, c, s, d, first, partner, H: tl.constexpr, H_PAD: tl.constexpr,
                 D: tl.constexpr):  # fmt: skip
    h = tl.arange(0, H_PAD)[:, None]
    m = (h < H) & (d[None, :] < D)
    x = tl.load(X + t * s_xt + h * s_xh + d[None, :], mask=m, other=0.0)
    xp = tl.load(X + t * s_xt + h * s_xh + partner[None, :], mask=m, other=0.0)
    rot = tl.where(first[None, :], -xp, xp)
    ty = OUT.dtype.element_ty
    out = (x * c[None, :]).to(ty).to(tl.float32) + (rot * s[None, :]).to(ty).to(tl.float32)
    tl.store(OUT + t * s_ot + h * s_oh + d[None, :], out.to(ty), mask=m)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO, s_qt, s_qh, s_kt, s_kh, s_ct, s_st, s_qot, s_qoh, s_kot, s_koh,
    H: tl.constexpr, H_PAD: tl.constexpr, HKV: tl.constexpr, HKV_PAD: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token's query and key heads: ``x * cos + rotate_half(x) * sin``, each product rounded to the dtype and
    their sum rounded again, as transformers' ``apply_rotary_pos_emb`` computes it in that dtype. PDL: as
    :func:`_add_rmsnorm_kernel`'s."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL >= 2:
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0)
    d = tl.arange(0, D_PAD)
    first = d < D // 2
    partner = tl.where(first, d + D // 2, d - D // 2)
    c = tl.load(COS + t * s_ct + d, mask=d < D, other=0.0)
    s = tl.load(SIN + t * s_st + d, mask=d < D, other=0.0)
    _rotary_rows(Q, QO, t, s_qt, s_qh, s_qot, s_qoh, c, s, d, first, partner, H, H_PAD, D)
    _rotary_rows(K, KO, t, s_kt, s_kh, s_kot, s_koh, c, s, d, first, partner, HKV, HKV_PAD, D)


def rotary_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether :func:`rotary` takes these (the layout transformers' attention modules pass): ``q [1, H, T, D]``,
    ``k [1, Hkv, T, D]``, ``cos`` and ``sin [1, T, D]`` over the whole head, one dtype, rows of contiguous values."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or q.shape[0] != 1 or k.shape[0] != 1:
        return False
    t, d = q.shape[2], q.shape[3]
    return (
        k.shape[2] == t
        and k.shape[3] == d
        and d % 2 == 0
        and cos.shape == sin.shape == (1, t, d)
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and all(x.stride(-1) == 1 for x in (q, k, cos, sin))
    )


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pdl: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (rotate-half, the whole head) for inputs that
    :func:`rotary_fits`, in one kernel where torch takes about ten; the results are laid out ``[1, T, heads, D]``
    underneath, which the attention reads without a copy. ``pdl``: as :func:`add_rmsnorm`'s."""
    _, heads, tokens, dim = q.shape
    kvh = k.shape[1]
    qo = torch.empty(1, tokens, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    ko = torch.empty(1, tokens, kvh, dim, dtype=k.dtype, device=k.device).transpose(1, 2)
    if tokens == 0:
        return qo, ko
    # enable_fp_fusion=False: no fused multiply-adds, so that float32 rounds as torch's separate ops do
    _rotary_kernel[(tokens,)](
        q, k, cos, sin, qo, ko, q.stride(2), q.stride(1), k.stride(2), k.stride(1), cos.stride(1), sin.stride(1),
        qo.stride(2), qo.stride(1), ko.stride(2), ko.stride(1),
        H=heads, H_PAD=triton.next_power_of_2(heads), HKV=kvh, HKV_PAD=triton.next_power_of_2(kvh), D=dim,
        D_PAD=triton.next_power_of_2(dim), PDL=pdl, num_warps=4, enable_fp_fusion=False, **pdl_launch(pdl),
    )  # fmt: skip
    return qo, ko


@triton.jit
def _norm_row(x, cols, mask, n, eps, R, W, PRE, OUT_TY: tl.constexpr, HAS_RES: tl.constexpr, HAS_PRE: tl.constexpr):
    """One row's residual add + RMSNorm, :func:`add_rmsnorm`'s arithmetic: ``x`` (float32, zeros past ``n``) is
    RMSNormed with PRE first (HAS_PRE, rounded to OUT_TY), added into the residual row R (HAS_RES, which takes the
    sum rounded), then normed with W; returns the normed row in OUT_TY."""
    w = tl.load(W + cols, mask=mask, other=0.0)
    if HAS_PRE:  # the same arithmetic as a call of its own with weight PRE (rounded to OUT's dtype), in registers
        p = tl.load(PRE + cols, mask=mask, other=0.0)
        y = x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)
        x = (y.to(p.dtype) * p).to(OUT_TY).to(tl.float32)
    if HAS_RES:
        x += tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(R + cols, x.to(R.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, 0) / n
    y = x * tl.rsqrt(var + eps)
    return (y.to(w.dtype) * w).to(OUT_TY)


@triton.jit
def _add_rmsnorm_kernel(
    X, R, W, PRE, OUT, s_x, s_r, s_o, n, eps, s_split,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_PRE: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One row. SPLITS > 0: X holds that many float32 partial sums of the row (``s_split`` apart), added in order and
    rounded to OUT's dtype, as the GEMM that wrote them whole would have rounded its output. (The splits' loads are
    unrolled, so they are all in flight at once: one after another, a row of 8 splits took longer than the norm.)
    PDL (launched under programmatic dependent launch, :func:`acb.kernels.pdl_choice`'s level): it waits for the
    kernel before first thing, and from level 2 lets the next kernel launch right after."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL >= 2:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    if SPLITS > 0:
        x = tl.load(X + row * s_x + cols, mask=mask, other=0.0)
        for i in tl.static_range(1, SPLITS):
            x += tl.load(X + i * s_split + row * s_x + cols, mask=mask, other=0.0)
        x = x.to(OUT.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(X + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    out = _norm_row(x, cols, mask, n, eps, R + row * s_r, W, PRE, OUT.dtype.element_ty, HAS_RES, HAS_PRE)
    tl.store(OUT + row * s_o + cols, out, mask=mask)


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    pre: torch.Tensor | None = None,
    pdl: int = 0,
) -> torch.Tensor:
    """``residual += x`` (when given), then RMSNorm of the sum; returns the normed rows (``x`` itself is kept).

    ``pre``: RMSNorm ``x`` with this weight first (Gemma 3's norms on the attention's and the MLP's outputs, before
    they join the residual stream): one kernel for what would be ``add_rmsnorm(add_rmsnorm(x, None, pre, eps),
    residual, weight, eps)``, with the same result.

    ``x`` may also be float32 partial sums ``[splits, rows, n]`` of a split-K projection
    (:class:`acb.kernels.projection.SplitProjection`): they are added in order and rounded to the dtype of
    ``residual`` (or of ``weight`` without one) first, as the whole product written out would have been.

    ``pdl`` (CUDA, compute capability 9.0 or later; a level of :func:`acb.kernels.pdl_choice`): launched under
    programmatic dependent launch, so that its launch overlaps the end of the kernel before it, which it waits for
    before it reads or writes anything; from level 2 it lets the next kernel launch right after."""
    if x.dim() == 3:
        splits, rows, n = x.shape
        dtype = residual.dtype if residual is not None else weight.dtype
        out = torch.empty(rows, n, dtype=dtype, device=x.device)
        s_x, s_split = x.stride(1), x.stride(0)
    else:
        rows, n = x.shape
        out = torch.empty_like(x)
        splits, s_x, s_split = 0, x.stride(0), 0
    res = residual if residual is not None else out
    _add_rmsnorm_kernel[(rows,)](
        x, res, weight, pre if pre is not None else weight, out, s_x, res.stride(0), out.stride(0), n, eps, s_split,
        BLOCK=triton.next_power_of_2(n), HAS_RES=residual is not None, HAS_PRE=pre is not None, SPLITS=splits,
        PDL=pdl, num_warps=8 if n >= 4096 else 4, **pdl_launch(pdl),
    )  # fmt: skip
    return out


@triton.jit
def _silu_mul_kernel(GU, OUT, s_g, s_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(GU + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_g + n + cols, mask=mask, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    tl.store(OUT + row * s_o + cols, act * u, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` of shape ``[T, 2 * I]``."""
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block)
    return out


# The fused gate/up kernel's reach: steps of at most this many rows (more are prompt steps, compute-bound, where
# cuBLAS's large tiles belong). On an H200 it beats cuBLAS gate/up + silu_mul at every decode size it takes
# (docs/benchmarks.md, "The gate/up projection with its activation in one kernel").
GATE_UP_ROWS = 128

# BLOCK_M -> (BLOCK_N, BLOCK_K, num_warps, num_stages) for 2-byte weights; 4-byte ones take half the BLOCK_K. At
# 128 rows, wide column tiles where they still give every SM a program (llama-8b's 14,336 columns), else narrow
# ones (llama-1b's 8,192: 64 programs of 128 columns would leave half the SMs idle).
_GATE_UP_TILES = {16: (32, 256, 4, 3), 32: (64, 128, 4, 4), 64: (64, 128, 4, 4), 128: (64, 64, 4, 5)}
_GATE_UP_WIDE = (128, 64, 8, 4)


@triton.jit(do_not_specialize=["M"])  # any row count, one compiled variant per tile: no compile mid-serving
def _gate_up_act_kernel(
    X, G, U, OUT, M, N, K, s_xm, s_gn, s_un, s_om,
    ACT: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """``OUT[:, n] = act(X @ G[n]) * (X @ U[n])`` for this program's BLOCK_N columns n and BLOCK_M rows: one pass
    over the gate weights' rows and the matching up rows, the activation in the epilogue. The products are rounded
    to OUT's dtype before the activation, as a GEMM writing them out would. PDL: see :func:`add_rmsnorm`. (Loading
    the first tile of weights before the wait gained nothing: docs/benchmarks.md, session 30.)"""
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL >= 2:
        tl.extra.cuda.gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    xp = X + rm[:, None] * s_xm + rk[None, :]
    gp = G + rn[:, None].to(tl.int64) * s_gn + rk[None, :]
    up = U + rn[:, None].to(tl.int64) * s_un + rk[None, :]
    rows = rm[:, None] < M
    cols = rn[:, None] < N
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:  # K a multiple of BLOCK_K, N of BLOCK_N: only the rows are masked
            x = tl.load(xp, mask=rows, other=0.0)
            wg = tl.load(gp)
            wu = tl.load(up)
        else:
            ks = (k0 + rk)[None, :] < K
            x = tl.load(xp, mask=rows & ks, other=0.0)
            wg = tl.load(gp, mask=cols & ks, other=0.0)
            wu = tl.load(up, mask=cols & ks, other=0.0)
        acc_g = tl.dot(x, tl.trans(wg), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, tl.trans(wu), acc_u, input_precision=PRECISION)
        xp += BLOCK_K
        gp += BLOCK_K
        up += BLOCK_K
    out = _gated(acc_g, acc_u, OUT.dtype.element_ty, ACT)
    tl.store(OUT + rm[:, None] * s_om + rn[None, :], out, mask=rows & (rn[None, :] < N))


@triton.jit
def _gated(acc_g, acc_u, ty: tl.constexpr, ACT: tl.constexpr):
    """``act(g) * u`` in ``ty`` from the float32 gate and up products, each rounded to ``ty`` first as a GEMM writing
    them out would; ACT 0: SiLU, 1: GELU (tanh approximation, Gemma)."""
    g = acc_g.to(ty).to(tl.float32)
    if ACT == 0:
        act = g / (1.0 + tl.exp(-g))
    else:  # tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g * (1.0 - 1.0 / (1.0 + tl.exp(2.0 * z)))
    return act.to(ty) * acc_u.to(ty)


def gate_up_act(
    x: torch.Tensor, w: torch.Tensor, activation: str = "silu", up: torch.Tensor | None = None, pdl: int = 0
) -> torch.Tensor:
    """``act(x @ gate.T) * (x @ up.T)`` for ``w = [gate | up]`` of shape ``[2 * I, K]`` (or ``w = gate`` and ``up``
    apart, each ``[I, K]``, as transformers' MLP modules hold them) and at most :data:`GATE_UP_ROWS` rows of
    ``x [M, K]``; ``activation``: ``"silu"`` or ``"gelu_tanh"``. One kernel where cuBLAS + :func:`silu_mul` take two
    and write the ``[M, 2 * I]`` product out between them. ``pdl``: as :func:`add_rmsnorm`'s."""
    rows, k = x.shape
    if up is None:
        w, up = w.chunk(2)
    if w.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError("gate_up_act reads weights whose rows are contiguous")
    inter = w.shape[0]
    if rows > GATE_UP_ROWS:
        raise ValueError(f"gate_up_act takes at most {GATE_UP_ROWS} rows, got {rows}")
    block_m = max(16, triton.next_power_of_2(rows))
    block_n, block_k, warps, stages = _GATE_UP_TILES[block_m]
    shared, sms = _device(x.device) if x.is_cuda else (1 << 30, 132)
    if block_m == 128 and triton.cdiv(inter, _GATE_UP_WIDE[0]) >= 3 * sms // 4:
        block_n, block_k, warps, stages = _GATE_UP_WIDE
    block_k = block_k * 2 // x.element_size()
    stage = (block_m + 2 * block_n) * block_k * x.element_size()
    stages = max(2, min(stages, shared // stage))  # what shared memory holds (an A100 has 164 KB, an H100 227 KB)
    x = x.contiguous()
    out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    _gate_up_act_kernel[(triton.cdiv(rows, block_m), triton.cdiv(inter, block_n))](
        x, w, up, out, rows, inter, k, x.stride(0), w.stride(0), up.stride(0), out.stride(0),
        ACT=0 if activation == "silu" else 1, EVEN=k % block_k == 0 and inter % block_n == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, num_warps=warps, num_stages=stages,
        **pdl_launch(pdl),
    )  # fmt: skip
    return out


@triton.jit
def _argmax_chunk_kernel(X, VAL, IDX, s_x, n, CHUNKS, BLOCK: tl.constexpr):
    """The largest value of one chunk of one row and the first column holding it; NaN counts as +inf."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * s_x + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    top = tl.max(x, 0)
    tl.store(VAL + row * CHUNKS + chunk, top)
    tl.store(IDX + row * CHUNKS + chunk, tl.min(tl.where(x == top, cols, n), 0))


@triton.jit
def _argmax_merge_kernel(VAL, IDX, OUT, TOKENS, SLOTS, n, CHUNKS, CHUNKS_PAD: tl.constexpr, INTO: tl.constexpr):
    """The row's argmax from its chunks'. ``INTO``: also written to ``TOKENS`` at the row's slot, and ``OUT`` gets
    ``-1`` where the row's largest value is not finite (a NaN counted as +inf, +inf, or a row of -inf)."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_PAD)
    val = tl.load(VAL + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
    idx = tl.load(IDX + row * CHUNKS + c, mask=c < CHUNKS, other=n)
    top = tl.max(val, 0)
    best = tl.min(tl.where(val == top, idx, n), 0).to(tl.int64)
    if INTO:
        tl.store(TOKENS + tl.load(SLOTS + row), best)
        best = tl.where((top > float("-inf")) & (top < float("inf")), best, -1)
    tl.store(OUT + row, best)


_ARGMAX_BLOCK = 4096


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of ``[rows, vocab]`` logits (int64 ``[rows]``): the first column holding each row's
    largest value. A row with a NaN gives its first NaN or +inf, where torch gives its first NaN; either way the
    value there is not finite, which is all :func:`acb.sampling.flag_non_finite` asks of it.

    Two small kernels, chunks of a row then the row: torch's reduction gives a few dozen rows of a 128K vocabulary
    a few blocks and took ~33 µs of a 1.3 ms decode step on an H200 (docs/benchmarks.md, issue 16)."""
    return _argmax(logits, None)


def argmax_into(logits: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """A decode graph's greedy sample: each row's :func:`argmax_rows`, written to ``tokens`` (the token buffer) at
    the row's entry of ``slots``, and returned with ``-1`` in the rows whose logits are not finite, as
    :func:`acb.sampling.flag_non_finite` flags them. In the two kernels of :func:`argmax_rows`, where the write and
    the flag took five more (an index write, a gather, ``isfinite``, a negation and a fill)."""
    return _argmax(logits, (tokens, slots))


def _argmax(logits: torch.Tensor, into: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, n = logits.shape
    chunks = triton.cdiv(n, _ARGMAX_BLOCK)
    val = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    _argmax_chunk_kernel[(rows, chunks)](logits, val, idx, logits.stride(0), n, chunks, BLOCK=_ARGMAX_BLOCK)
    tokens, slots = into if into is not None else (out, out)
    _argmax_merge_kernel[(rows,)](val, idx, out, tokens, slots, n, chunks,
                                  CHUNKS_PAD=max(2, triton.next_power_of_2(chunks)), INTO=into is not None,
                                  num_warps=1)  # fmt: skip
    return out


@functools.cache
def _device(device: torch.device) -> tuple[int, int]:
    """``(bytes of shared memory one program may take, SMs)`` of ``device``."""
    props = torch.cuda.get_device_properties(device)
    return props.shared_memory_per_block_optin, props.multi_processor_count
