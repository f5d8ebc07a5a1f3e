"""Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3: pre-norm decoder layers, RMSNorm, SwiGLU, rotary embeddings;
optional Q/K/V biases (Qwen2), per-head Q/K norms (Qwen3), sliding windows (Mistral, Qwen2/3 with
``use_sliding_window``)."""

from __future__ import annotations

import torch

from . import LeanLayer, LeanSpec, Unsupported, fuse, rope_check, standard_spec


def check(model) -> None:
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {cfg.hidden_act!r} (the adapter implements silu)")
    if getattr(cfg, "mlp_bias", False):
        raise Unsupported("MLP biases")
    rope_check(cfg)


def windows(model) -> list[int]:
    """Each layer's sliding window (0: full attention): ``layer_types`` where the config has them (Qwen2/3), else
    Mistral's one ``sliding_window`` for every layer."""
    cfg = model.config
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or 0
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else 0 for t in types[:n]]
    if type(model).__name__ == "MistralForCausalLM":
        return [window] * n
    return [0] * n


def lean_spec(model) -> LeanSpec:
    check(model)
    inner = model.model
    layers = []
    for layer, window in zip(inner.layers, windows(model)):
        a, m = layer.self_attn, layer.mlp
        layers.append(
            LeanLayer(
                ln1=layer.input_layernorm.weight,
                qkv_w=fuse(a.q_proj, a.k_proj, a.v_proj),
                qkv_b=None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                o_w=a.o_proj.weight,
                ln2=layer.post_attention_layernorm.weight,
                gate_up_w=fuse(m.gate_proj, m.up_proj),
                down_w=m.down_proj.weight,
                q_norm=a.q_norm.weight if hasattr(a, "q_norm") else None,
                k_norm=a.k_norm.weight if hasattr(a, "k_norm") else None,
                window=window,
            )
        )
    return standard_spec(model, layers)
