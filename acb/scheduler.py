"""Continuous batching: which sequences run in the next step, and how many tokens each.

Pure Python, no torch. Policy:

- a step holds at most ``max_num_seqs`` sequences and ``max_num_batched_tokens`` tokens;
- running sequences go first, oldest first: a decode costs one token, an unfinished prompt a chunk of what is left
  of the budget (chunked prefill mixes with decodes in the same step);
- waiting sequences are admitted strictly first-in first-out while the budget, the sequence slots and the free KV
  blocks allow; the head of the queue is never skipped;
- while a batch is decoding and more requests queue behind the waiting ones (``backlog``, set by the engine), new
  sequences start in groups of ``admission_group`` (or once they were held ``admission_max_delay`` steps). A step
  that starts a prompt runs eagerly, a decode-only step replays a CUDA graph: under a queue of short requests,
  starting each one as a slot frees would make nearly every step an eager one. With no backlog a request starts at
  once, so a lightly loaded engine adds no latency;
- when a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks are
  freed and it is recomputed from its tokens later (prompt and output so far), so its output is unchanged.

Steps may overlap (see :mod:`acb.engine`): a sequence scheduled while its previous sample is still on the device
decodes from the runner's device token buffer. Resources are released as soon as a sequence finishes or is
preempted, even if a step that uses them is still in flight: steps execute in launch order on one stream (one
worker thread on the CPU), so a block reused by step N+1 is only written after step N is done with it.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from .block_allocator import BlockAllocator
from .sequence import SeqStatus, Sequence

__all__ = ["ScheduledSeq", "ScheduledStep", "SampledToken", "Scheduler"]


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step: positions ``start .. start + num_tokens - 1``."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    """Whether the logits of the last position are sampled (a decode, or the last chunk of a prompt)."""


@dataclass(slots=True)
class ScheduledStep:
    step_id: int
    entries: list[ScheduledSeq]
    num_tokens: int

    @property
    def sampled(self) -> list[ScheduledSeq]:
        return [e for e in self.entries if e.sample]


@dataclass(slots=True)
class SampledToken:
    """A token accepted into a sequence, handed on to detokenization."""

    seq: Sequence
    token_id: int
    logprob: float | None
    finish_reason: str | None = None
    is_stop_token: bool = False


@dataclass
class Scheduler:
    allocator: BlockAllocator
    max_num_seqs: int
    max_num_batched_tokens: int
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    admission_group: int = 1
    admission_max_delay: int = 0
    num_preemptions: int = 0
    backlog: int = 0
    """Requests queued behind ``waiting`` (in the engine, waiting for a free slot)."""
    _next_step: int = 0
    _free_slots: list[int] = field(default_factory=list)
    _held_steps: int = 0  # consecutive steps that held waiting sequences back

    def __post_init__(self) -> None:
        self._free_slots = list(range(self.max_num_seqs - 1, -1, -1))

    # -- queue management -------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new (or preempted) sequence, keeping arrival order."""
        seq.status = SeqStatus.WAITING
        if not self.waiting or self.waiting[-1].arrival < seq.arrival:
            self.waiting.append(seq)
        else:
            items = list(self.waiting)
            items.insert(bisect.bisect([s.arrival for s in items], seq.arrival), seq)
            self.waiting = deque(items)

    @property
    def room_for_new(self) -> int:
        """How many new sequences the scheduler could start now (the engine admits no more than this)."""
        return max(0, self.max_num_seqs - len(self.running) - len(self.waiting))

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished, aborted, failed) and release its blocks and slot at once."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    # -- one step -----------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        """Pick the next step's work, or ``None`` when nothing can run now."""
        budget = self.max_num_batched_tokens
        entries: list[ScheduledSeq] = []

        i = 0
        prefill = False
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens_to_compute, budget)
            if n == 0:
                i += 1
                continue
            grow = -(-(seq.num_computed + n) // self.allocator.block_size) > len(seq.block_table)
            if grow and not self._grow(seq, n):
                break  # seq itself was preempted; everything after it is newer and was preempted too
            entries.append(self._take(seq, n))
            prefill |= n > 1
            budget -= n
            i += 1

        admit = bool(self.waiting) and self._admit_now(decoding=bool(entries) and not prefill)
        while admit and self.waiting and budget > 0 and self._free_slots:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # a preempted sequence whose last sample is still in flight: strict FIFO waits for it
            n = min(seq.num_tokens_to_compute, budget)
            if n == 0:
                break
            need = self.allocator.blocks_for(n) - len(seq.block_table)
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.slot = self._free_slots.pop()
            seq.block_table.extend(self.allocator.allocate(need))
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            entries.append(self._take(seq, n))
            budget -= n

        if not entries:
            return None
        step = ScheduledStep(self._next_step, entries, self.max_num_batched_tokens - budget)
        self._next_step += 1
        return step

    def on_step_done(
        self, step: ScheduledStep, tokens: list[int], logprobs: list[float] | None
    ) -> tuple[list[SampledToken], list[Sequence]]:
        """Accept the sampled tokens of a finished step. Returns what is to be detokenized, in order, and the
        sequences whose row the runner flagged as broken (token ``-1``: non-finite logits), for the engine to fail."""
        out: list[SampledToken] = []
        broken: list[Sequence] = []
        for k, entry in enumerate(e for e in step.entries if e.sample):
            seq = entry.seq
            seq.num_pending -= 1
            if seq.status is SeqStatus.FINISHED:
                continue  # the extra step a finished sequence runs under overlap: its token is dropped
            tok = tokens[k]
            if tok < 0:
                broken.append(seq)
                continue
            seq.token_ids.append(tok)
            reason = None
            is_stop = tok in seq.stop_ids
            if is_stop:
                reason = "stop"
            elif len(seq.token_ids) >= seq.max_len:
                reason = "length"
            out.append(SampledToken(seq, tok, None if logprobs is None else logprobs[k], reason, is_stop))
            if reason is not None:
                self.finish(seq, reason)
        return out, broken

    def unschedule(self, step: ScheduledStep) -> None:
        """Undo the latest scheduled ``step``, which was never launched: its sequences keep their blocks and slots,
        and compute those positions in a later step."""
        for entry in step.entries:
            entry.seq.num_computed -= entry.num_tokens
            if entry.sample:
                entry.seq.num_pending -= 1

    def on_step_failed(self, step: ScheduledStep) -> list[Sequence]:
        """A step raised: its sequences cannot trust their KV any more. Returns the live ones to fail."""
        failed = []
        for entry in step.entries:
            if entry.sample:
                entry.seq.num_pending -= 1
            if entry.seq.status is not SeqStatus.FINISHED and entry.seq not in failed:
                failed.append(entry.seq)
        return failed

    # -- internals ----------------------------------------------------------------------------------------------

    def _admit_now(self, decoding: bool) -> bool:
        """Whether waiting sequences may start in this step (see the module doc: admission groups)."""
        if (
            not decoding  # nothing runs, or this step starts a prompt anyway: it is eager already
            or self.backlog == 0
            or len(self.waiting) >= self.admission_group
            or self._held_steps >= self.admission_max_delay
        ):
            self._held_steps = 0
            return True
        self._held_steps += 1
        return False

    def _take(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed
        seq.num_computed += n
        sample = seq.num_computed == len(seq.token_ids) + seq.num_pending
        if sample:
            seq.num_pending += 1
        return ScheduledSeq(seq, start, n, sample)

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Give a running sequence blocks for ``n`` more positions, preempting newer ones if needed.

        Returns False when ``seq`` itself had to be preempted.
        """
        need = self.allocator.blocks_for(seq.num_computed + n) - len(seq.block_table)
        while not self.allocator.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        self.num_preemptions += 1
        self.add(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None
