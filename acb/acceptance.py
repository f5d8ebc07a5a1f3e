"""Token acceptance: what a finished step's samples do to its sequences, and what goes on to delivery.

Each sampling row's token is appended to its sequence; a stop token or the length limit ends the sequence (through
the scheduler's ``finish``, which releases its blocks and slot at once); a row flagged broken (token ``-1``: the
logits were not finite) is handed back for the engine to fail. A multi-step round gives each row up to ``num_steps``
tokens; those after a row's end were computed and are dropped, never emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .sequence import SeqStatus, Sequence

if TYPE_CHECKING:
    from .scheduler import ScheduledStep

__all__ = ["StepOutput", "accept"]


@dataclass(slots=True)
class StepOutput:
    """What a finished step hands on to delivery: per sequence that got tokens, in row order, a tuple
    ``(seq, token_ids, logprobs or None, finish_reason or None, ends_with_stop_token, alternatives or None)``; and
    the sequences whose row the runner flagged as broken (token ``-1``: non-finite logits), for the engine to fail."""

    accepted: list[tuple[Sequence, list[int], list[float] | None, str | None, bool, list | None]]
    """Per request: (sequence, new tokens, their logprobs, finish reason, whether the last is a stop token, their
    top alternatives as ``[(ids, logprobs), ...]`` per token or None)."""
    broken: list[Sequence]


def accept(
    step: ScheduledStep,
    tokens: list[list[int]],
    logprobs: list[list[float]] | None,
    top: tuple[list, list] | None,
    finish: Callable[[Sequence, str], None],
) -> StepOutput:
    """Accept the sampled tokens of a finished step: ``tokens[j][r]`` is sub-step ``j``'s sample of the step's
    ``r``-th sampling row (one sub-step unless the step is a multi-step round); ``logprobs`` alike, and ``top`` the
    alternatives (ids and log-probabilities, ``[j][r][k]``) when some row asked for them. ``finish(seq, reason)``
    ends a sequence."""
    accepted: list = []
    broken: list[Sequence] = []
    finished = SeqStatus.FINISHED
    if step.num_steps == 1:
        toks = tokens[0]
        lps = logprobs[0] if logprobs is not None else None
        rows = step.seqs if step.sample.all() else [s for s, m in zip(step.seqs, step.sample) if m]
        for r, seq in enumerate(rows):
            seq.num_pending -= 1
            if seq.status is finished:
                continue  # the extra step a finished sequence runs under overlap: its token is dropped
            tok = toks[r]
            if tok < 0:
                broken.append(seq)
                continue
            ids = seq.token_ids
            ids.append(tok)
            alts = None if top is None else _alternatives(seq, top, 0, r)
            lp = None if lps is None else [lps[r]]
            if tok in seq.stop_ids:
                accepted.append((seq, [tok], lp, "stop", True, alts))
                finish(seq, "stop")
            elif len(ids) >= seq.max_len:
                accepted.append((seq, [tok], lp, "length", False, alts))
                finish(seq, "length")
            else:
                accepted.append((seq, [tok], lp, None, False, alts))
        return StepOutput(accepted, broken)
    for r, (seq, count) in enumerate(zip(step.seqs, step.counts.tolist())):
        seq.num_pending -= count
        if seq.status is finished:
            continue
        got: list[int] = []
        got_lp: list[float] | None = None if logprobs is None else []
        got_alts: list | None = None if top is None or not seq.params.top_logprobs else []
        reason = None
        stop = False
        ids = seq.token_ids
        for j in range(count):
            tok = tokens[j][r]
            if tok < 0:
                broken.append(seq)
                break
            ids.append(tok)
            got.append(tok)
            if got_lp is not None:
                got_lp.append(logprobs[j][r])
            if got_alts is not None:
                got_alts.extend(_alternatives(seq, top, j, r))
            if tok in seq.stop_ids:
                reason, stop = "stop", True
            elif len(ids) >= seq.max_len:
                reason = "length"
            if reason is not None:
                break  # the round's later tokens for this row are dropped (computed, never emitted)
        if got:
            accepted.append((seq, got, got_lp, reason, stop, got_alts))
        if reason is not None:
            finish(seq, reason)
    return StepOutput(accepted, broken)


def _alternatives(seq: Sequence, top: tuple[list, list], j: int, r: int) -> list[tuple[list[int], list[float]]] | None:
    """The top alternatives a sequence asked for, of sub-step ``j``'s row ``r`` (the step computed the most any row
    asked for)."""
    k = seq.params.top_logprobs
    if not k:
        return None
    return [(top[0][j][r][:k], top[1][j][r][:k])]
