"""Small fused kernels of the lean model path: rotary embedding folded into the KV-cache write, residual add +
RMSNorm, and SiLU·mul. Each replaces several eager torch kernels (and their round trips through memory)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope_and_cache", "add_rmsnorm", "silu_mul"]


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
def _add_rmsnorm_kernel(X, R, W, OUT, s_x, s_r, s_o, n, eps, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(R + row * s_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(R + row * s_r + cols, x.to(R.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, 0) / n
    y = x * tl.rsqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(OUT + row * s_o + cols, (y.to(W.dtype.element_ty) * w).to(OUT.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``residual += x`` (when given), then RMSNorm of the sum; returns the normed rows (``x`` itself is kept)."""
    rows, n = x.shape
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    _add_rmsnorm_kernel[(rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), n, eps,
        BLOCK=triton.next_power_of_2(n), HAS_RES=residual is not None, num_warps=8 if n >= 4096 else 4,
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
