"""Continuous batching: which sequences run in the next step, and how many tokens each.

Pure Python, no torch. Policy:

- a step holds at most ``max_num_seqs`` sequences and ``max_num_batched_tokens`` tokens;
- running sequences go first, oldest first: a decode costs one token, an unfinished prompt a chunk of what is left
  of the budget (chunked prefill mixes with decodes in the same step). The budget keeps one token for every running
  sequence that decodes, so an older prompt (one resumed after preemption) never takes a decode's place; and while
  running sequences decode, the step's prompt tokens (chunks and new prompts together) are capped at
  ``prefill_chunk_tokens`` when it is set, which bounds what prompts add to the running streams' inter-token
  latency;
- waiting sequences are admitted strictly first-in first-out while the budget, the sequence slots and the free KV
  blocks allow; the head of the queue is never skipped;
- while a batch is decoding and more requests queue behind the waiting ones (``backlog``, set by the engine), new
  sequences start in groups of ``admission_group`` (or once they were held ``admission_max_delay`` steps). A step
  that starts a prompt runs eagerly, a decode-only step replays a CUDA graph: under a queue of short requests,
  starting each one as a slot frees would make nearly every step an eager one. With no backlog a request starts at
  once, so a lightly loaded engine adds no latency;
- when a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks are
  freed and it is recomputed from its tokens later (prompt and output so far), so its output is unchanged.

A step is columnar: the sequences, and numpy arrays of where each starts, how many positions it computes and whether
it samples. A decode-only step whose batch did not change since the last one (the steady state of a busy engine) is
made from the last step's arrays with a few vector operations: the Python work per sequence is two counter
increments, and blocks are grown only for the rows that cross a block boundary.

Multi-step decode (``decode_steps`` > 1): a decode-only step may run several positions per sequence back to back on
the device (``ScheduledStep.num_steps``), each fed with the previous position's sample from the device token buffer,
so scheduling, preparation, result processing and delivery happen once per round instead of once per token. Only
steps that admit nobody and prefill nothing become rounds; a row that would pass its length limit stops early.

Steps may overlap (see :mod:`acb.engine`): a sequence scheduled while its previous sample is still on the device
decodes from the runner's device token buffer. Resources are released as soon as a sequence finishes or is
preempted, even if a step that uses them is still in flight: steps execute in launch order on one stream (one
worker thread on the CPU), so a block reused by step N+1 is only written after step N is done with it.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .acceptance import StepOutput, accept
from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence

__all__ = ["ScheduledSeq", "ScheduledStep", "StepOutput", "Scheduler"]


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
    """One step, by rows: row ``i`` computes positions ``starts[i] .. starts[i] + counts[i] - 1`` of ``seqs[i]``.

    With ``num_steps == 1`` a row samples after its last position if ``sample[i]``. With ``num_steps > 1`` (a
    multi-step decode round) every row is a decode that runs one position per sub-step and samples after each, for
    ``counts[i] <= num_steps`` sub-steps."""

    step_id: int
    seqs: list[Sequence]
    starts: np.ndarray  # int64 [B]
    counts: np.ndarray  # int64 [B]
    sample: np.ndarray  # bool [B]
    num_tokens: int  # tokens of the (first) sub-step
    num_steps: int = 1
    composition: int = -1
    """Equal for two steps exactly when they hold the same sequences in the same rows (lets batch preparation reuse
    per-row arrays)."""
    grown: list[int] | None = None
    """Rows whose block table grew while this step was scheduled (``None``: not tracked, check every row)."""
    epochs: list[int] | None = None
    """Each row's ``Sequence.epoch`` when scheduled: a row whose sequence was preempted since holds nothing now."""

    @property
    def decode_only(self) -> bool:
        return self.num_steps > 1 or self.num_tokens == len(self.seqs)

    @property
    def entries(self) -> list[ScheduledSeq]:
        """Row by row, as objects (tests, failure paths; the hot paths read the arrays)."""
        return [
            ScheduledSeq(seq, start, count, bool(sample))
            for seq, start, count, sample in zip(self.seqs, self.starts.tolist(), self.counts.tolist(), self.sample)
        ]


@dataclass
class Scheduler:
    blocks: BlockManager
    max_num_seqs: int
    max_num_batched_tokens: int
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    admission_group: int = 1
    admission_max_delay: int = 0
    decode_steps: int = 1
    """Positions per sequence in one decode-only step (multi-step decode); 1 = off."""
    prefill_chunk_tokens: int | None = None
    """While running sequences decode, a step's prompt tokens stop here (None: the whole token budget)."""
    num_preemptions: int = 0
    backlog: int = 0
    """Requests queued behind ``waiting`` (in the engine, waiting for a free slot)."""
    _next_step: int = 0
    _free_slots: list[int] = field(default_factory=list)
    _held_steps: int = 0  # consecutive steps that held waiting sequences back
    _version: int = 0  # bumped whenever ``running`` changes
    _compositions: int = 0  # numbers the distinct row lists of steps
    _last: ScheduledStep | None = None  # the last decode-only step, reusable while _version stays the same
    _last_version: int = -1
    _last_limits: np.ndarray | None = None  # its rows' length limits
    _last_blocks: np.ndarray | None = None  # its rows' block counts

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
            self._version += 1
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
        if not self.waiting and self._last_version == self._version:
            step = self._next_decode()
            if step is not None:
                return step
        return self._schedule()

    def _next_decode(self) -> ScheduledStep | None:
        """The step after the last decode-only one, with the same rows: vector operations, and Python work per row
        only for the two counters and for rows that need a new block. ``None`` if that does not apply."""
        last, limits, blocks = self._last, self._last_limits, self._last_blocks
        seqs = last.seqs
        starts = last.starts + last.counts
        remaining = limits - 1 - starts  # positions each row may still compute
        if (remaining <= 0).any():
            return None  # a row reached its length limit: it leaves the batch (the general path)
        k = self.decode_steps
        counts = np.minimum(remaining, k) if k > 1 else np.ones_like(starts)
        k = int(counts.max())  # a round never runs a sub-step that no row needs
        needed = -(-(starts + counts) // self.blocks.block_size)
        short = np.flatnonzero(needed > blocks)
        if short.size:
            if not self.blocks.can_allocate(int((needed - blocks)[short].sum())):
                return None  # preemption needed: the general path decides who goes
            for i in short.tolist():
                self.blocks.extend(seqs[i], int(needed[i] - blocks[i]))
            blocks[short] = needed[short]
        if k > 1 and int(counts.min()) == int(counts.max()):
            c = int(counts[0])
            for seq in seqs:
                seq.num_computed += c
                seq.num_pending += c
        else:
            for seq, c in zip(seqs, counts.tolist()):
                seq.num_computed += c
                seq.num_pending += c
        step = ScheduledStep(
            self._next_step, seqs, starts, counts, last.sample, len(seqs), k, last.composition, short.tolist(),
            last.epochs,
        )  # fmt: skip
        self._next_step += 1
        self._last = step
        return step

    def _schedule(self) -> ScheduledStep | None:
        budget = self.max_num_batched_tokens
        rows: list[tuple[Sequence, int, int, bool]] = []  # (seq, start, count, sample)

        # one token kept for each decode not scheduled yet; prompt tokens capped while anything decodes
        decodes = sum(1 for seq in self.running if seq.num_tokens_to_compute == 1)
        prompt_room = budget if self.prefill_chunk_tokens is None or not decodes else self.prefill_chunk_tokens
        i = 0
        prefill = False
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = seq.num_tokens_to_compute
            if n == 1:
                decodes -= 1
            else:
                n = min(n, budget - decodes, prompt_room)
            if n <= 0:
                i += 1
                continue
            grow = -(-(seq.num_computed + n) // self.blocks.block_size) > len(seq.block_table)
            if grow and not self._grow(seq, n):
                break  # seq itself was preempted; everything after it is newer and was preempted too
            rows.append(self._take(seq, n))
            if n > 1:
                prefill = True
                prompt_room -= n
            budget -= n
            i += 1
        if prompt_room < budget and not any(r[2] == 1 for r in rows):  # nothing decodes after all: no cap
            prompt_room = budget

        admit = bool(self.waiting) and self._admit_now(decoding=bool(rows) and not prefill)
        admitted = False
        while admit and self.waiting and budget > 0 and self._free_slots:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # a preempted sequence whose last sample is still in flight: strict FIFO waits for it
            if seq.after is not None and seq.after.num_output == 0 and seq.after.status is not SeqStatus.FINISHED:
                break  # another sample of its prompt computes the prompt first, for the prefix cache (n > 1)
            cached, parent = self._cached_prefix(seq)
            reuse = len(cached) * self.blocks.block_size
            to_compute = seq.num_tokens_to_compute - reuse
            n = min(to_compute, budget, prompt_room if to_compute > 1 else budget)
            if n <= 0:
                break
            need = self.blocks.blocks_for(reuse + n) - len(cached)
            if not self.blocks.can_allocate(need + self.blocks.cost(cached)):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.slot = self._free_slots.pop()
            if cached:  # positions the prefix cache already holds: computed by someone before
                self.blocks.reuse(seq, cached, parent)
                seq.num_computed = reuse
            self.blocks.count_query(len(seq.token_ids), reuse)
            self.blocks.extend(seq, need)
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            self._version += 1
            rows.append(self._take(seq, n))
            budget -= n
            if n > 1:
                prompt_room -= n
            admitted = True

        if not rows:
            return None
        seqs = [r[0] for r in rows]
        starts = np.fromiter((r[1] for r in rows), np.int64, len(rows))
        counts = np.fromiter((r[2] for r in rows), np.int64, len(rows))
        sample = np.fromiter((r[3] for r in rows), np.bool_, len(rows))
        num_tokens = self.max_num_batched_tokens - budget
        self._compositions += 1  # a new list of rows (the fast path keeps its predecessor's)
        step = ScheduledStep(self._next_step, seqs, starts, counts, sample, num_tokens, 1, self._compositions)
        step.epochs = [s.epoch for s in seqs]
        decode_only = num_tokens == len(seqs) and not admitted and bool(sample.all())
        if decode_only and self.decode_steps > 1:
            self._extend_to_round(step)
        self._next_step += 1
        # reusable by _next_decode only if every running sequence is in it, in running order
        self._last = step if decode_only and len(seqs) == len(self.running) else None
        self._last_version = self._version if self._last is not None else -1
        if self._last is not None:
            self._last_limits = np.fromiter((s.max_len for s in seqs), np.int64, len(seqs))
            self._last_blocks = np.fromiter((len(s.block_table) for s in seqs), np.int64, len(seqs))
        return step

    def _extend_to_round(self, step: ScheduledStep) -> None:
        """Turn a decode-only step into a multi-step round, if every row's extra blocks are free (no preemption for
        a round: it would only be an optimization)."""
        k = self.decode_steps
        limits = np.fromiter((s.max_len for s in step.seqs), np.int64, len(step.seqs))
        counts = np.minimum(limits - 1 - step.starts, k)
        if int(counts.max()) <= 1:
            return
        bs = self.blocks.block_size
        need = -(-(step.starts + counts) // bs)
        have = np.fromiter((len(s.block_table) for s in step.seqs), np.int64, len(step.seqs))
        short = np.flatnonzero(need > have)
        if short.size and not self.blocks.can_allocate(int((need - have)[short].sum())):
            return
        for i in short.tolist():
            self.blocks.extend(step.seqs[i], int(need[i] - have[i]))
        for seq, c in zip(step.seqs, counts.tolist()):
            seq.num_computed += c - 1
            seq.num_pending += c - 1
        step.counts = counts
        step.num_steps = int(counts.max())
        step.grown = None

    def on_step_done(
        self,
        step: ScheduledStep,
        tokens: list[list[int]],
        logprobs: list[list[float]] | None,
        top: tuple[list, list] | None = None,
    ) -> StepOutput:
        """Accept the sampled tokens of a finished step (:func:`acb.acceptance.accept`), after offering the blocks it
        filled to the prefix cache."""
        if self.blocks.prefix_caching:
            self._commit(step)
        return accept(step, tokens, logprobs, top, self.finish)

    def _commit(self, step: ScheduledStep) -> None:
        """The step's KV is on the device now: offer the blocks it filled to the prefix cache. Only rows that
        completed a block matter; a row whose sequence ended or was preempted since holds no blocks of the step."""
        bs = self.blocks.block_size
        ends = step.starts + step.counts
        running = SeqStatus.RUNNING
        for r in np.flatnonzero(step.starts // bs != ends // bs).tolist():
            seq = step.seqs[r]
            if seq.status is running and seq.epoch == step.epochs[r]:
                self.blocks.commit_seq(seq, int(ends[r]))

    def on_step_failed(self, step: ScheduledStep) -> list[Sequence]:
        """A step raised: its sequences cannot trust their KV any more. Returns the live ones to fail."""
        failed = []
        for seq, count, sample in zip(step.seqs, step.counts.tolist(), step.sample.tolist()):
            if sample:
                seq.num_pending -= count if step.num_steps > 1 else 1
            if seq.status is not SeqStatus.FINISHED and seq not in failed:
                failed.append(seq)
        return failed

    def unschedule(self, step: ScheduledStep) -> None:
        """Undo the latest scheduled ``step``, which was never launched: its sequences keep their blocks and slots,
        and compute those positions in a later step."""
        for seq, count, sample in zip(step.seqs, step.counts.tolist(), step.sample.tolist()):
            seq.num_computed -= count
            if sample:
                seq.num_pending -= count if step.num_steps > 1 else 1
        self._last = None
        self._last_version = -1

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

    def _take(self, seq: Sequence, n: int) -> tuple[Sequence, int, int, bool]:
        start = seq.num_computed
        seq.num_computed += n
        sample = seq.num_computed == len(seq.token_ids) + seq.num_pending
        if sample:
            seq.num_pending += 1
        return seq, start, n, sample

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Give a running sequence blocks for ``n`` more positions, preempting newer ones if needed.

        Returns False when ``seq`` itself had to be preempted.
        """
        need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
        while not self.blocks.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.extend(seq, need)
        return True

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], int | None]:
        """The prefix cache's blocks for a sequence about to start (or restart after preemption): its known tokens
        but the last, which must be computed to sample the next one."""
        if seq.block_table or not self.blocks.prefix_caching:
            return [], None
        return self.blocks.match(seq.token_ids, len(seq.token_ids) - 1)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._version += 1
        self._release(seq)
        seq.num_computed = 0
        seq.epoch += 1
        self.num_preemptions += 1
        self.add(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None
