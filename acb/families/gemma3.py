"""Gemma 3 (text): sandwich norms (before and after both attention and MLP), RMSNorm scaled by ``1 + w`` in
float32, per-head Q/K norms, GELU (tanh) gating, embeddings scaled by sqrt(hidden), ``query_pre_attn_scalar`` for
the softmax scale, and alternating layers: sliding-window layers with a local rotary base, full-attention layers
with the global one. Attention logit soft-capping (Gemma 2) is not implemented: such models run the generic path.
"""

from __future__ import annotations

import torch

from . import LeanLayer, LeanSpec, Unsupported, fuse, head_dim_of, rope_check, rotary_tables, standard_spec


def check(model) -> None:
    cfg = model.config
    if getattr(cfg, "hidden_activation", None) not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise Unsupported(f"activation {getattr(cfg, 'hidden_activation', None)!r} (the adapter implements gelu tanh)")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise Unsupported("attention logit soft-capping")
    if not getattr(cfg, "layer_types", None):
        raise Unsupported("a config without layer_types (transformers too old for this adapter)")
    rope_check(cfg)


def _one_plus(w: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by ``1 + w``: fold it into the weight once (a small new tensor)."""
    return (1.0 + w.detach().float()).to(w.dtype)


def lean_spec(model) -> LeanSpec:
    check(model)
    cfg, inner = model.config, model.model
    device = inner.embed_tokens.weight.device
    head_dim = head_dim_of(cfg)
    if hasattr(inner, "rotary_emb_local"):  # transformers before per-layer-type rotary parameters
        tables = [rotary_tables(inner.rotary_emb, device, head_dim), rotary_tables(inner.rotary_emb_local, device,
                                                                                    head_dim)]  # fmt: skip
    else:
        tables = [rotary_tables(inner.rotary_emb, device, head_dim, layer_type=t)
                  for t in ("full_attention", "sliding_attention")]  # fmt: skip
    layers = []
    for layer, kind in zip(inner.layers, cfg.layer_types):
        a, m = layer.self_attn, layer.mlp
        sliding = kind == "sliding_attention"
        layers.append(
            LeanLayer(
                ln1=_one_plus(layer.input_layernorm.weight),
                qkv_w=fuse(a.q_proj, a.k_proj, a.v_proj),
                qkv_b=None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                o_w=a.o_proj.weight,
                ln2=_one_plus(layer.pre_feedforward_layernorm.weight),
                gate_up_w=fuse(m.gate_proj, m.up_proj),
                down_w=m.down_proj.weight,
                q_norm=_one_plus(a.q_norm.weight),
                k_norm=_one_plus(a.k_norm.weight),
                post_attn_norm=_one_plus(layer.post_attention_layernorm.weight),
                post_mlp_norm=_one_plus(layer.post_feedforward_layernorm.weight),
                window=cfg.sliding_window if sliding else 0,
                rope=1 if sliding else 0,
            )
        )
    return standard_spec(
        model,
        layers,
        norm=_one_plus(inner.norm.weight),
        rotary=tables,
        activation="gelu_tanh",
        embed_scale=_embed_scale(inner.embed_tokens),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
    )


def _embed_scale(embed) -> float:
    """Gemma's embedding scale: its buffer (sqrt(hidden) in the model's dtype); computed the same way for a model on
    the meta device (tensor-parallel shards built per rank)."""
    scale = embed.embed_scale
    if scale.device.type == "meta":
        return float(torch.tensor(embed.embedding_dim**0.5, dtype=scale.dtype))
    return float(scale)
