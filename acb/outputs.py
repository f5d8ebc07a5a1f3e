"""What the engine hands back: streamed :class:`Token` objects, a whole :class:`Completion`, and
:class:`EngineStats`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = ["FinishReason", "Token", "Completion", "EngineStats"]

FinishReason = Literal["length", "stop", "abort"]


class Token(NamedTuple):
    """One generated token as streamed by :meth:`acb.Engine.stream` (an immutable named tuple: one is made per
    generated token, so it is the lightest immutable record Python has).

    ``text`` is the text this token adds to the output; it may be ``""`` (an incomplete multi-byte character is held
    back until it completes, and a possible stop-string prefix until it is ruled out). ``finish_reason`` is set on
    the last item of a stream only. When a request is aborted, its stream ends with a marker whose ``id`` is ``None``.
    ``top_logprobs`` (when the request asked for them): ``((token id, logprob), ...)``, most likely first.
    """

    id: int | None
    text: str
    logprob: float | None = None
    finish_reason: FinishReason | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(slots=True, frozen=True)
class Completion:
    """A finished request, as returned by :meth:`acb.Engine.generate`."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
    """Per token, when asked: its alternatives as in :attr:`Token.top_logprobs`."""

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the tokens' log-probabilities (when asked for logprobs)."""
        return None if self.logprobs is None else sum(self.logprobs)


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of the engine's load. Every live request is counted in exactly one of ``num_running`` (in the
    batch, or finished there with its last tokens not yet delivered), ``num_waiting`` (admitted, waiting for a batch
    slot, including preempted ones) and ``num_pending`` (waiting for room in the admission queue: ``max_pending``
    backpressure)."""

    kv_blocks_total: int
    kv_blocks_free: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    steps: int
    num_pending: int = 0
    prefix_queries: int = 0
    """Requests that started (or restarted after preemption), each looking up its prompt in the prefix cache."""
    prefix_hits: int = 0
    """... of which found at least one cached block."""
    prefix_queried_tokens: int = 0
    prefix_cached_tokens: int = 0
    """Prompt tokens looked up, and those the cache held (not computed again)."""
    prefix_evictions: int = 0
    """Cached blocks reused for new content."""
    prefix_cached_blocks: int = 0
    """Blocks the prefix cache holds now."""
