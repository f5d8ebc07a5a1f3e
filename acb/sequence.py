"""A request's state inside the engine: its tokens, how far its KV cache is computed, and what it holds.

Pure Python (no torch): the scheduler and the block manager reason about sequences in microseconds.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SamplingParams

__all__ = ["SeqStatus", "Sequence"]


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request as the scheduler sees it.

    Token accounting under overlap: a step that samples a token for this sequence may still be in flight when the
    next step is scheduled. ``num_pending`` counts those tokens: they exist on the device (in the runner's token
    buffer) but not yet in ``token_ids``. ``num_computed`` counts positions whose KV is written or scheduled to be.
    """

    __slots__ = (
        "request_id",
        "arrival",
        "params",
        "token_ids",
        "num_prompt",
        "max_len",
        "stop_ids",
        "status",
        "num_computed",
        "num_pending",
        "block_table",
        "slot",
        "seed",
        "finish_reason",
        "epoch",
        "num_hashed",
        "prefix_hash",
        "grammar",
        "after",
    )

    def __init__(
        self,
        request_id: str,
        arrival: int,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        max_model_len: int,
        eos_ids: frozenset[int],
        seed: int,
    ) -> None:
        self.request_id = request_id
        self.arrival = arrival
        self.params = params
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.max_len = min(self.num_prompt + params.max_new_tokens, max_model_len)
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= eos_ids
        self.stop_ids = frozenset(stop)
        self.status = SeqStatus.WAITING
        self.num_computed = 0
        self.num_pending = 0
        self.block_table: list[int] = []
        self.slot: int | None = None
        self.seed = seed
        self.finish_reason: str | None = None
        self.epoch = 0  # bumped when preempted: a step scheduled before belongs to a block table since let go
        self.num_hashed = 0  # leading blocks of block_table the prefix cache has seen (registered, or matched)
        self.prefix_hash: int | None = None  # the chained hash of the last of them
        self.grammar = None  # the output constraint's matcher (acb.grammar.Grammar), advanced by the step worker
        self.after: Sequence | None = None  # another sample of the same prompt that must start first (n > 1)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_tokens_to_compute(self) -> int:
        """Positions still to run through the model, counting tokens pending on the device.

        The last token of a sequence that reached its length limit is never fed back, so it needs no KV.
        """
        total = len(self.token_ids) + self.num_pending
        target = total - 1 if total >= self.max_len else total
        return max(0, target - self.num_computed)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={len(self.token_ids)}, "
            f"computed={self.num_computed}, pending={self.num_pending}, blocks={len(self.block_table)})"
        )
