"""Model families: how each transformers architecture maps onto acb's lean model.

One small adapter per family (a module here) reads a loaded transformers model and returns a :class:`LeanSpec`:
its weights (Q/K/V and gate/up fused, the model's own projections becoming views of the fused tensors), its norms
and their variants, its rotary tables, per-layer sliding windows, its activation. :mod:`acb.lean_model` runs any
spec; it knows no family by name. A model whose family has no adapter, or that uses a feature its adapter refuses,
runs the generic path (transformers' own modules with acb's paged attention), and :func:`lean_plan` says why.

Adding a family: a module with a ``lean_spec(model) -> LeanSpec`` function (raise :class:`Unsupported` for what it
cannot map), one line in :data:`ADAPTERS`, and a tiny config in ``acb/default_model.py`` so that the tests compare it
with ``model.generate`` (docs/architecture.md, "Adding a model family").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

__all__ = ["LeanLayer", "LeanSpec", "Unsupported", "ADAPTERS", "lean_plan", "fuse", "standard_spec"]


class Unsupported(Exception):
    """The model uses something its family's lean adapter does not implement (the message says what)."""


@dataclass(slots=True)
class LeanLayer:
    """One decoder layer's weights, as the lean forward uses them."""

    ln1: torch.Tensor  # the input norm's weight (for a ``1 + w`` norm: ``1 + w`` already)
    qkv_w: torch.Tensor  # [q + 2 kv rows, hidden]
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    ln2: torch.Tensor  # the norm before the MLP
    gate_up_w: torch.Tensor  # [2 intermediate, hidden]
    down_w: torch.Tensor
    q_norm: torch.Tensor | None = None  # per-head RMSNorm of queries and keys before rotary (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # sandwich norms (Gemma 3): on the attention and MLP outputs
    post_mlp_norm: torch.Tensor | None = None
    window: int = 0  # sliding-window attention over this many positions (0: the whole context)
    rope: int = 0  # which of the spec's rotary tables this layer uses


@dataclass(slots=True)
class LeanSpec:
    layers: list[LeanLayer]
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float  # attention softmax scale
    rotary: list  # callables ``(max_positions) -> (cos, sin)`` [positions, head_dim // 2] float32, one per table
    activation: str = "silu"  # or "gelu_tanh"
    embed_scale: float | None = None  # multiply the embeddings by this (Gemma: sqrt(hidden))
    final_softcap: float | None = None  # logits = cap * tanh(logits / cap)


# architecture (transformers class name) -> adapter module
ADAPTERS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}


def lean_plan(model) -> tuple[str | None, str]:
    """``(adapter module, why)``: the adapter that maps ``model`` onto the lean path (None if none does), and the
    reason, in words, for the log and ``engine.path_reason``. Checks only; builds nothing."""
    arch = type(model).__name__
    name = ADAPTERS.get(arch)
    if name is None:
        return None, f"{arch} has no lean adapter (acb.families)"
    try:
        adapter(name).check(model)
    except Unsupported as exc:
        return None, f"{arch}: {exc}"
    return name, f"{arch} through the {name} adapter"


def adapter(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def rope_check(cfg, allowed=("default", "llama3", "linear")) -> None:
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    if "rope_type" not in rope and "type" not in rope and all(isinstance(v, dict) for v in rope.values()):
        kinds = {v.get("rope_type", "default") for v in rope.values()}  # per layer type (Gemma 3)
    else:
        kinds = {rope.get("rope_type", rope.get("type", "default"))}
    bad = kinds - set(allowed)
    if bad:
        raise Unsupported(f"rotary scaling {sorted(bad)} is not implemented on the lean path")
    factor = (
        rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 1.0
    )
    if factor not in (None, 1.0):
        raise Unsupported(f"partial rotary embeddings (factor {factor}) are not implemented on the lean path")


def fuse(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight for several projections of the same input, concatenated by output rows; each projection's own
    weight becomes a view into it, so the model keeps working as it was and the fusion costs no memory."""
    fused = torch.cat([m.weight.detach() for m in linears], dim=0)
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[row : row + rows], requires_grad=False)
        row += rows
    return fused


def rotary_tables(rotary, device, head_dim: int, **kwargs):
    """A table builder from a transformers rotary module: cos/sin of every position, first halves, float32."""

    if torch.device(device).type == "meta" or any(b.is_meta for b in rotary.buffers()):
        # a model built without weights (sharded later, or read a layer at a time): tables on the CPU
        with torch.device("cpu"):
            rotary, device = type(rotary)(rotary.config), torch.device("cpu")

    @torch.no_grad()
    def build(max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(max_positions, device=device)[None]
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32, device=device), pos, **kwargs)
        return cos[0, :, : head_dim // 2].float().contiguous(), sin[0, :, : head_dim // 2].float().contiguous()

    return build


def standard_spec(model, layers: list[LeanLayer], **fields) -> LeanSpec:
    """A spec with what most families name alike (``model.model.embed_tokens``, ``.norm``, ``.rotary_emb``,
    ``model.lm_head``, the config's head counts, ``rms_norm_eps``, the attention modules' ``scaling``); ``fields``
    override or add to it."""
    cfg, inner = model.config, model.model
    heads = cfg.num_attention_heads
    head_dim = head_dim_of(cfg)
    base = dict(
        layers=layers,
        embed=inner.embed_tokens.weight,
        norm=inner.norm.weight,
        lm_head=model.lm_head.weight,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        eps=cfg.rms_norm_eps,
        scale=inner.layers[0].self_attn.scaling,
    )
    if "rotary" not in fields:
        base["rotary"] = [rotary_tables(inner.rotary_emb, inner.embed_tokens.weight.device, head_dim)]
    base.update(fields)
    return LeanSpec(**base)


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
