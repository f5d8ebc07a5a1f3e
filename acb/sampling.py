"""Batched sampling on the model's device: greedy, temperature, top-k, top-p, per-request seeds.

Randomness is counter-based: the noise for a request's token at position ``p`` is a hash of ``(seed, p, vocab
index)``, computed with integer tensor ops. A seeded request therefore samples the same tokens whatever else
shares its batches, across preemption and recompute, with no per-request generator objects and no host sync.
Sampling uses the exponential-race form of the Gumbel-max trick: ``argmax(probs / E)`` with ``E ~ Exp(1)`` draws
from ``probs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingTensors", "sample", "flag_non_finite", "uniform_noise", "Top"]

_MASK32 = 0xFFFFFFFF


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters as device tensors, plus host flags that let whole stages be skipped.

    When ``all_greedy`` the tensors are not read and may be None (the runner then copies none of them)."""

    temperature: torch.Tensor | None  # [S] float32, 0 = greedy
    top_k: torch.Tensor | None  # [S] int64, 0 = off
    top_p: torch.Tensor | None  # [S] float32, 1 = off
    seeds: torch.Tensor | None  # [S] int64 in [0, 2**32)
    positions: torch.Tensor | None  # [S] int64
    all_greedy: bool
    needs_filter: bool
    needs_logprobs: bool


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[S, vocab]`` uniforms in (0, 1), a pure function of (seed, position, column)."""
    row = _mix32((_mix32(seeds & _MASK32) ^ ((positions * 0x9E3779B1) & _MASK32)) & _MASK32)
    col = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _mix32((row[:, None] ^ ((col[None, :] * 0x85EBCA77) & _MASK32)) & _MASK32)
    h = _mix32((h + 0x27D4EB2F) & _MASK32)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf (always keeping the most likely token)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly ahead of each token
    drop |= before > top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def flag_non_finite(logits: torch.Tensor, greedy: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` with ``-1`` in every row whose logits hold a NaN or +inf, or are all -inf.

    One gather per row, not a pass over the vocabulary: argmax lands on a NaN or +inf wherever there is one (torch
    orders NaN above every number), and on -inf only when the whole row is -inf."""
    top = logits.gather(-1, greedy[:, None])[:, 0]
    return tokens.masked_fill(~torch.isfinite(top), -1)


Top = tuple[torch.Tensor, torch.Tensor]  # ([S, k] token ids, [S, k] log-probabilities), most likely first


def sample(
    logits: torch.Tensor, t: SamplingTensors, *, raw: torch.Tensor | None = None, top_logprobs: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, Top | None]:
    """Pick one token per row of ``logits [S, vocab]``; returns ``(tokens [S], logprobs [S] or None, top)``.

    ``raw``: the model's own logits where ``logits`` were processed (penalties, biases, grammar masks,
    :mod:`acb.logits`); log-probabilities are always those of the model's unmodified distribution. ``top``: the
    ``top_logprobs`` most likely tokens of that distribution per row, when asked.

    A row whose logits are not finite (see :func:`flag_non_finite`), or whose processing left no token possible,
    gets token ``-1``: the caller fails that request alone and must not feed ``-1`` to the model.
    """
    logits = logits.float()
    greedy = logits.argmax(-1)
    if t.all_greedy:
        tokens = greedy
    else:
        scaled = logits / t.temperature.clamp_min(1e-6)[:, None]
        if t.needs_filter:
            scaled = _filter_top_k_top_p(scaled, t.top_k, t.top_p)
        probs = scaled.softmax(-1)
        race = probs / -torch.log(uniform_noise(t.seeds, t.positions, logits.shape[-1]))
        tokens = torch.where(t.temperature == 0, greedy, race.argmax(-1))
    model = logits if raw is None else raw.float()
    logprobs = top = None
    if t.needs_logprobs:
        dist = model.log_softmax(-1)
        logprobs = dist.gather(-1, tokens[:, None])[:, 0]
        if top_logprobs:
            values, ids = dist.topk(top_logprobs, dim=-1)
            top = (ids, values)
    tokens = flag_non_finite(logits, greedy, tokens)
    if raw is not None:
        tokens = flag_non_finite(model, model.argmax(-1), tokens)
    return tokens, logprobs, top
