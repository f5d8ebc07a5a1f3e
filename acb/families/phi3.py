"""Phi-3 (mini, small, medium): the Llama layout with Q/K/V and gate/up already fused in the checkpoint
(``qkv_proj``, ``gate_up_proj``), and a sliding window on every layer where the config sets one. Long-context
variants (``longrope`` scaling) run the generic path."""

from __future__ import annotations

from . import LeanLayer, LeanSpec, Unsupported, rope_check, standard_spec


def check(model) -> None:
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {cfg.hidden_act!r} (the adapter implements silu)")
    rope_check(cfg)  # refuses longrope and partial rotary factors (Phi-3 128k, Phi-4-mini)


def lean_spec(model) -> LeanSpec:
    check(model)
    cfg, inner = model.config, model.model
    window = getattr(cfg, "sliding_window", None) or 0
    layers = [
        LeanLayer(
            ln1=layer.input_layernorm.weight,
            qkv_w=layer.self_attn.qkv_proj.weight,
            qkv_b=layer.self_attn.qkv_proj.bias,
            o_w=layer.self_attn.o_proj.weight,
            ln2=layer.post_attention_layernorm.weight,
            gate_up_w=layer.mlp.gate_up_proj.weight,
            down_w=layer.mlp.down_proj.weight,
            window=window,
        )
        for layer in inner.layers
    ]
    return standard_spec(model, layers)
