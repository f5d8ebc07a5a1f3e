"""Logits processing: what a request asks of its next token's distribution besides temperature and top-k/top-p.

Penalties (presence, frequency, repetition), ``logit_bias`` and ``min_tokens`` need each request's history, which
lives on the device, per sequence slot, so that no step waits for the host:

- ``counts[slot, token]``: how often each token occurs in the output so far, advanced on the device by each step's
  samples (overlap keeps working: step N+1 sees step N's token before the host does);
- ``prompt[slot, token]``: whether the prompt holds the token (repetition penalty);
- ``bias[slot, token]`` and ``stoppers[slot, token]`` (the EOS and stop token ids ``min_tokens`` holds back).

Each tensor is allocated the first time a request needs it ([slots + 1, vocab]), and a slot's rows are written
once, when a sequence takes the slot (:class:`SlotSetup`, built on the host by :mod:`acb.batch`). A step whose rows
ask for none of this skips the whole pass; one that does processes only those rows.

Structured output's grammar masks are applied in the same place (:mod:`acb.grammar`), after these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SlotSetup", "StepProcessing", "LogitsState"]


@dataclass(slots=True)
class SlotSetup:
    """What a sequence brings to its slot's device rows when it takes the slot."""

    slot: int
    output_ids: list[int]
    prompt_ids: list[int] | None  # only with a repetition penalty
    bias: tuple[tuple[int, float], ...] | None
    stoppers: list[int] | None  # only with min_tokens


@dataclass(slots=True)
class StepProcessing:
    """The step's rows that take the processing pass (indices into its sampling rows) and their parameters."""

    ints: np.ndarray  # [3, P] int64: rows (into the step's sampling rows), their slots, min_tokens
    floats: np.ndarray  # [3, P] float32: presence, frequency and repetition penalties
    use_counts: bool  # some row has a presence or frequency penalty
    use_repetition: bool
    use_bias: bool
    use_min_tokens: bool
    _device: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The two parameter arrays on the device: two small copies per step (kept for a round's sub-steps)."""
        if self._device is None:
            self._device = (
                torch.from_numpy(self.ints).to(device, non_blocking=True),
                torch.from_numpy(self.floats).to(device, non_blocking=True),
            )
        return self._device


class LogitsState:
    """The per-slot device tensors, and the pass that applies them (runs on the step worker)."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device, fused: bool | None = None) -> None:
        """``fused``: one Triton kernel for the pass (:mod:`acb.kernels.penalties`; default on CUDA), else torch
        operations (the CPU, and the oracle the kernel is tested against)."""
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        self.device = device
        self._kernel = None
        if fused if fused is not None else device.type == "cuda":
            from .kernels.penalties import apply_penalties

            self._kernel = apply_penalties
        self.counts: torch.Tensor | None = None  # [slots, V] int32
        self.out_len: torch.Tensor | None = None  # [slots] int64
        self.prompt: torch.Tensor | None = None  # [slots, V] bool
        self.bias: torch.Tensor | None = None  # [slots, V] float32
        self.stoppers: torch.Tensor | None = None  # [slots, V] bool

    def _table(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = getattr(self, name)
        if t is None:
            t = torch.zeros(self.num_slots + 1, self.vocab_size, dtype=dtype, device=self.device)
            setattr(self, name, t)
        return t

    def setup(self, setups: list[SlotSetup]) -> None:
        """Write the device rows of slots that sequences just took (before the step that first runs them)."""
        for s in setups:
            self._setup(s)

    def _setup(self, s: SlotSetup) -> None:
        dev = self.device
        counts = self._table("counts", torch.int32)
        if self.out_len is None:
            self.out_len = torch.zeros(self.num_slots + 1, dtype=torch.int64, device=dev)
        counts[s.slot].zero_()
        if s.output_ids:
            ids = torch.tensor(s.output_ids, dtype=torch.int64, device=dev)
            counts[s.slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        self.out_len[s.slot] = len(s.output_ids)
        if s.prompt_ids is not None:
            row = self._table("prompt", torch.bool)[s.slot]
            row.zero_()
            row[torch.tensor(s.prompt_ids, dtype=torch.int64, device=dev)] = True
        if s.bias is not None:
            row = self._table("bias", torch.float32)[s.slot]
            row.zero_()
            ids, values = zip(*s.bias)
            row[torch.tensor(ids, dtype=torch.int64, device=dev)] = torch.tensor(values, device=dev)
        if s.stoppers is not None:
            row = self._table("stoppers", torch.bool)[s.slot]
            row.zero_()
            row[torch.tensor(s.stoppers, dtype=torch.int64, device=dev)] = True

    def apply(self, logits: torch.Tensor, p: StepProcessing) -> torch.Tensor:
        """``logits [S, V]`` (float32, the step's sampling rows) with the processing rows changed, in place."""
        ints, floats = p.on_device(self.device)
        if self._kernel is not None:
            self._kernel(
                logits, ints, floats, self.counts, self.prompt, self.bias, self.stoppers, self.out_len,
                use_repetition=p.use_repetition, use_counts=p.use_counts, use_bias=p.use_bias,
                use_min_tokens=p.use_min_tokens,
            )  # fmt: skip
            return logits
        rows, slots = ints[0], ints[1]
        x = logits[rows]
        if p.use_repetition:
            penalty = floats[2][:, None]
            seen = self.counts[slots] > 0
            if self.prompt is not None:
                seen |= self.prompt[slots]
            x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
        if p.use_counts:
            c = self.counts[slots].float()
            x = x - floats[1][:, None] * c - floats[0][:, None] * (c > 0).float()
        if p.use_bias:
            x = x + self.bias[slots]
        if p.use_min_tokens:
            short = self.out_len[slots] < ints[2]
            x = x.masked_fill(self.stoppers[slots] & short[:, None], float("-inf"))
        logits[rows] = x
        return logits

    def record(self, tokens: torch.Tensor, p: StepProcessing) -> None:
        """Count the samples of the processing rows (``tokens``: the step's samples, -1 for a failed row)."""
        if self.counts is None:
            return
        ints, _ = p.on_device(self.device)
        slots = ints[1]
        toks = tokens[ints[0]].clamp_min(0)
        self.counts.index_put_((slots, toks), torch.ones_like(toks, dtype=torch.int32), accumulate=True)
        self.out_len.index_add_(0, slots, torch.ones_like(slots))
