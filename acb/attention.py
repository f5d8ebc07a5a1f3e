"""Paged attention plugged into transformers' attention interface.

acb runs every transformers causal LM on a *packed* batch: one row of ``T`` tokens holding the new tokens of every
sequence in the step, with per-token positions. Each attention layer calls :func:`paged_attention_forward` (registered
under :data:`ATTN_IMPLEMENTATION`), which writes the step's keys and values into the paged cache and attends each
sequence's queries to its own cached context. The step's layout travels as :class:`AttentionMetadata` through the
model's ``**kwargs``.

This module holds the plain-torch reference: correct on any device, used on the CPU and as the test oracle for
the GPU kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionMetadata",
    "paged_attention_forward",
    "paged_attention_reference",
    "register",
]

ATTN_IMPLEMENTATION = "acb_paged"


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's tokens go in the cache and which context each sequence attends to."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    query_start_loc: list[int]  # [B + 1] host: token offsets of each sequence in the packed row
    seq_lens: list[int]  # [B] host: context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] physical blocks of each sequence
    decode_only: bool  # every sequence has exactly one new token
    # The Triton kernels (acb.kernels.attention) and the device-side layout they read, on CUDA; None: the reference
    kernels: object | None = None
    device_seq_lens: torch.Tensor | None = None  # [B]
    device_query_start_loc: torch.Tensor | None = None  # [B + 1]
    max_query_len: int = 0
    decode_splits: int = 0  # > 0 in a decode-only step: the split decode kernel
    pdl: int = 0  # the decode kernel's PDL level (acb.kernels.pdl_choice)
    prefill_map: torch.Tensor | None = None  # the prefill kernel's programs, made by the step's first layer


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry point: ``query`` is ``[1, heads, T, head_dim]``."""
    meta: AttentionMetadata | None = kwargs.get("acb_meta")
    if meta is None:
        raise RuntimeError(
            "this model runs acb's paged attention; call it through acb.Engine (or pass acb_meta=AttentionMetadata)"
        )
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    kv = meta.kv_cache.layers[module.layer_idx]
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    kernels = meta.kernels is not None and softcap is None  # the paged Triton kernels (no soft-capping in them)
    if kernels and meta.decode_splits:  # the decode kernel writes the new keys and values to the cache itself
        out = meta.kernels.paged_decode(q, kv, meta.block_tables, meta.device_seq_lens, scale, meta.decode_splits,
                                        window=window or 0, new_kv=(k, v, meta.slot_mapping), pdl=meta.pdl)  # fmt: skip
        return out.unsqueeze(0), None
    meta.kv_cache.write(module.layer_idx, k, v, meta.slot_mapping)
    if kernels:
        if meta.prefill_map is None:
            meta.prefill_map = meta.kernels.prefill_block_map(
                meta.device_query_start_loc, q.shape[0], meta.max_query_len, q.shape[1] // k.shape[1]
            )
        out = meta.kernels.paged_prefill(q, kv, meta.block_tables, meta.device_seq_lens,
                                         meta.device_query_start_loc, meta.max_query_len, scale,
                                         window=window or 0, block_map=meta.prefill_map)  # fmt: skip
    else:
        out = paged_attention_reference(q, kv, meta, scale, sliding_window=window, softcap=softcap)
    return out.unsqueeze(0), None  # [1, T, H, D], as transformers expects


def paged_attention_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries ``[T, H, D]`` over the paged cache ``kv`` of one layer."""
    if meta.decode_only and softcap is None:
        return _decode_batched(q, kv, meta, scale, sliding_window)
    block_size = kv.shape[2]
    out = torch.empty_like(q)
    qsl = meta.query_start_loc
    for i, ctx in enumerate(meta.seq_lens):
        qs, qe = qsl[i], qsl[i + 1]
        n = qe - qs
        blocks = meta.block_tables[i, : -(-ctx // block_size)]
        k = kv[0, blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
        v = kv[1, blocks].flatten(0, 1)[:ctx]
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if sliding_window:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        out[qs:qe] = _attend(q[qs:qe], k, v, mask, scale, softcap)
    return out


def _attend(q, k, v, mask, scale, softcap):
    """``q [n, H, D]``, ``k/v [ctx, Hkv, D]``, boolean ``mask [n, ctx]`` -> ``[n, H, D]``."""
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if softcap is None:
        o = F.scaled_dot_product_attention(
            qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True
        )[0]
    else:
        group = qh.shape[0] // kh.shape[0]
        kh, vh = kh.repeat_interleave(group, 0), vh.repeat_interleave(group, 0)
        s = (qh.float() @ kh.float().transpose(1, 2)) * scale
        s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~mask, float("-inf"))
        o = (s.softmax(-1) @ vh.float()).to(q.dtype)
    return o.transpose(0, 1)


def _decode_batched(q, kv, meta, scale, sliding_window):
    """One new token per sequence: gather every context into a padded batch and attend in one call."""
    block_size = kv.shape[2]
    lens = torch.tensor(meta.seq_lens, device=q.device)
    max_ctx = max(meta.seq_lens)
    blocks = meta.block_tables[:, : -(-max_ctx // block_size)]
    k = kv[0, blocks].flatten(1, 2)  # [B, max_blocks * block_size, Hkv, D]
    v = kv[1, blocks].flatten(1, 2)
    k_pos = torch.arange(k.shape[1], device=q.device)
    mask = k_pos[None, :] < lens[:, None]
    if sliding_window:
        mask &= k_pos[None, :] >= (lens[:, None] - sliding_window)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(2)


def register() -> None:
    """Make :data:`ATTN_IMPLEMENTATION` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
