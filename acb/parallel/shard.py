"""How a lean model splits over ``world`` ranks (Megatron-style), from a whole :class:`~acb.families.LeanSpec`.

- Attention by heads: rank ``r`` keeps its ``num_heads / world`` query heads and ``num_kv_heads / world`` KV heads —
  their rows of the fused Q/K/V projection (and biases) and their columns of the output projection. Its KV cache
  holds only its KV heads.
- The MLP by intermediate columns: its rows of gate and of up (the fused ``[gate; up]`` keeps that order), its
  columns of down. The output projection and down are then partial sums: one all-reduce after each.
- The vocabulary in contiguous slices (the last padded with zero rows, so that every rank's slice has one size): the
  embedding looks up only its slice's ids (an all-reduce assembles the rows), the LM head computes only its slice's
  logits (an all-gather puts them side by side).
- Norms, per-head Q/K norms and the rotary tables are replicated. The tables are computed once, on rank 0, by the
  model's own rotary modules, and travel as tensors.

The shards are copies (contiguous, picklable): rank 0 sends ranks 1.. theirs through shared memory at start, and
each rank moves its own to its GPU (:func:`materialize`), so the whole model never has to fit on one GPU: it is
sharded where it was loaded (host memory). A model built on the ``meta`` device (no weights: a shape to benchmark)
gives ``meta`` shards, which each rank fills with random values on its own GPU.
"""

from __future__ import annotations

import dataclasses

import torch

from ..families import LeanLayer, LeanSpec

__all__ = ["shard_spec", "shard_layer", "FixedTables", "check_divisible", "materialize", "map_tensors"]


class FixedTables:
    """A rotary table computed in advance: ``(max_positions) -> (cos, sin)`` like the spec's callables."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin

    def __call__(self, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        if max_positions > self.cos.shape[0]:
            raise ValueError(f"rotary tables were built for {self.cos.shape[0]} positions, not {max_positions}")
        return self.cos, self.sin


def check_divisible(spec: LeanSpec, world: int) -> None:
    """Raise ValueError unless heads, KV heads and the MLP width divide evenly over ``world`` ranks."""
    inter = spec.layers[0].gate_up_w.shape[0] // 2
    for what, n in (("attention heads", spec.num_heads), ("KV heads", spec.num_kv_heads), ("MLP width", inter)):
        if n % world:
            raise ValueError(f"tensor_parallel_size={world} does not divide the model's {n} {what}")


@torch.no_grad()
def shard_spec(
    spec: LeanSpec, rank: int, world: int, max_positions: int, layers: list[LeanLayer] | None = None
) -> LeanSpec:
    """Rank ``rank``'s shard of ``spec``; ``layers``: its layers, already sharded (:func:`shard_layer`), instead of
    ``spec``'s."""
    check_divisible(spec, world)
    if layers is None:
        layers = [shard_layer(spec, lw, rank, world) for lw in spec.layers]
    return dataclasses.replace(
        spec,
        layers=layers,
        embed=_vocab_slice(spec.embed, rank, world),
        norm=spec.norm.clone(),
        lm_head=_vocab_slice(spec.lm_head, rank, world),
        num_heads=spec.num_heads // world,
        num_kv_heads=spec.num_kv_heads // world,
        rotary=[FixedTables(*(t.detach().contiguous() for t in build(max_positions))) for build in spec.rotary],
    )


@torch.no_grad()
def shard_layer(spec: LeanSpec, lw: LeanLayer, rank: int, world: int) -> LeanLayer:
    """Rank ``rank``'s shard of one layer ``lw`` of ``spec`` (copies)."""
    d = spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    q_part, kv_part = q // world, kv // world

    def heads(t: torch.Tensor) -> torch.Tensor:  # rows of fused Q/K/V (or its bias) for this rank's heads
        parts = (t[rank * q_part : (rank + 1) * q_part],
                 t[q + rank * kv_part : q + (rank + 1) * kv_part],
                 t[q + kv + rank * kv_part : q + kv + (rank + 1) * kv_part])  # fmt: skip
        return torch.cat(parts).contiguous()

    inter = lw.gate_up_w.shape[0] // 2
    part = inter // world
    gate_up = torch.cat([lw.gate_up_w[rank * part : (rank + 1) * part],
                         lw.gate_up_w[inter + rank * part : inter + (rank + 1) * part]])  # fmt: skip
    return dataclasses.replace(
        lw,
        ln1=lw.ln1.clone(),
        qkv_w=heads(lw.qkv_w),
        qkv_b=None if lw.qkv_b is None else heads(lw.qkv_b),
        o_w=lw.o_w[:, rank * q_part : (rank + 1) * q_part].contiguous(),
        ln2=lw.ln2.clone(),
        gate_up_w=gate_up.contiguous(),
        down_w=lw.down_w[:, rank * part : (rank + 1) * part].contiguous(),
        **{f: _copy(getattr(lw, f)) for f in ("q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")},
    )


_NORMS = ("ln1", "ln2", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm", "norm")


def map_tensors(spec: LeanSpec, fn) -> LeanSpec:
    """``spec`` with every tensor ``x`` of field ``name`` (``None`` stays) replaced by ``fn(name, x)``."""

    def each(name: str, x):
        return fn(name, x) if isinstance(x, torch.Tensor) else x

    layers = [dataclasses.replace(lw, **{f.name: each(f.name, getattr(lw, f.name)) for f in dataclasses.fields(lw)})
              for lw in spec.layers]  # fmt: skip
    rotary = [FixedTables(each("cos", t.cos), each("sin", t.sin)) for t in spec.rotary]
    return dataclasses.replace(spec, layers=layers, embed=each("embed", spec.embed), norm=each("norm", spec.norm),
                               lm_head=each("lm_head", spec.lm_head), rotary=rotary)  # fmt: skip


@torch.no_grad()
def materialize(spec: LeanSpec, device: torch.device, seed: int = 0) -> LeanSpec:
    """``spec`` on ``device``: real tensors are copied there; ``meta`` tensors become random ones made there (norm
    weights ones, biases zeros, every other weight normal with std 0.02, from ``seed``), for benchmarks of model
    shapes whose weights do not exist."""
    gen = None

    def make(name: str, x: torch.Tensor) -> torch.Tensor:
        nonlocal gen
        if x.device.type != "meta":
            return x.to(device)
        if name in _NORMS:
            return torch.ones(x.shape, dtype=x.dtype, device=device)
        if name.endswith("_b"):
            return torch.zeros(x.shape, dtype=x.dtype, device=device)
        if gen is None:
            gen = torch.Generator(device).manual_seed(seed)
        return torch.empty(x.shape, dtype=x.dtype, device=device).normal_(0.0, 0.02, generator=gen)

    return map_tensors(spec, make)


def vocab_range(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """The ids ``[lo, hi)`` of rank ``rank``'s vocabulary slice (slices of ``ceil(vocab / world)``)."""
    size = -(-vocab // world)
    return min(vocab, rank * size), min(vocab, (rank + 1) * size)


def _vocab_slice(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = -(-w.shape[0] // world)
    lo, hi = vocab_range(w.shape[0], rank, world)
    out = w.new_zeros(size, w.shape[1])
    out[: hi - lo] = w[lo:hi]
    return out


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()
