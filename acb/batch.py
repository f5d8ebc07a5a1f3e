"""Batch preparation: turn a :class:`~acb.scheduler.ScheduledStep` into the host arrays of one model step.

Everything here is numpy on the host; :mod:`acb.step_inputs` moves it to the device in one copy. The device keeps
each sequence slot's block table (written by diffs: only blocks allocated since the last step travel) and derives
the per-token cache slots and input ids itself, so a step carries positions, rows and slots, not tables.

A decode-only step with the same rows as the step before it (the steady state of a busy engine) reuses that step's
per-row arrays: its preparation is a few vector operations, plus Python work only for the rows that gained a block.
Other steps (prompts, mixed batches, a changed batch) read each row's few scalars in a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .logits import SlotSetup, StepProcessing
from .scheduler import ScheduledStep

__all__ = ["StepBatch", "BatchBuilder"]

_I64 = np.int64


@dataclass(slots=True)
class StepBatch:
    """Host-side inputs of one step (numpy), ready for :meth:`acb.runner.ModelRunner.launch`.

    A multi-step decode round is staged as its first sub-step plus ``counts``, each row's number of sub-steps; the
    device advances it to the next sub-steps itself (:meth:`acb.step_inputs.StepInputs.advance`)."""

    step: ScheduledStep
    # per token [T]
    input_ids: np.ndarray  # token id where known on the host (0 where read from the device)
    from_device: np.ndarray  # 1 where the input is the row's previous sample, in the device token buffer
    token_rows: np.ndarray  # row of each token
    positions: np.ndarray
    # per row [B]
    slots: np.ndarray  # sequence slot (token buffer entry, device block-table row)
    seq_lens: np.ndarray  # context length after this step
    query_start_loc: np.ndarray  # [B + 1]
    # per sampled row [S]
    sample_idx: np.ndarray  # packed token index whose logits are sampled
    sample_slots: np.ndarray
    sample_positions: np.ndarray  # position the sampled token will take (drives the seeded RNG)
    temperature: np.ndarray  # float32
    top_k: np.ndarray
    top_p: np.ndarray  # float32
    seeds: np.ndarray
    # block-table entries written since the last step: tables[slot, col] = block
    table_slots: np.ndarray
    table_cols: np.ndarray
    table_blocks: np.ndarray
    all_greedy: bool
    needs_filter: bool  # some request uses top-k or top-p
    needs_logprobs: bool
    counts: np.ndarray | None = None  # a round's sub-steps per row (None: a single step)
    # logits processing (acb.logits, acb.grammar): None / empty / 0 when no row of the step asks for it
    setups: list[SlotSetup] | None = None  # slots whose device history is written before this step
    processing: StepProcessing | None = None  # rows with penalties, biases or min_tokens
    grammar_rows: list | None = None  # (sampling row, Grammar) of constrained rows
    top_logprobs: int = 0  # alternatives to report per sampled row (the most any row asks for)

    @property
    def plain(self) -> bool:
        """Nothing but greedy sampling: a graph's own argmax is the answer."""
        return self.all_greedy and not self.needs_logprobs and self.processing is None and not self.grammar_rows

    @property
    def num_steps(self) -> int:
        return self.step.num_steps

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_rows(self) -> int:
        return len(self.slots)

    @property
    def decode_only(self) -> bool:
        return len(self.input_ids) == len(self.slots)

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())


_EMPTY = np.zeros(0, _I64)


class BatchBuilder:
    """Builds :class:`StepBatch` objects. Owns what the device's tables were last told (per slot) and the per-slot
    sampling parameters."""

    def __init__(self, max_num_seqs: int, block_size: int) -> None:
        self.block_size = block_size
        # per slot: the block list last sent to the device, and how much of it
        self._synced_list: list[list[int] | None] = [None] * max_num_seqs
        self._synced_len = [0] * max_num_seqs
        self._owner: list[object | None] = [None] * max_num_seqs  # the sequence whose parameters fill the slot
        self._temperature = np.zeros(max_num_seqs, np.float32)
        self._top_k = np.zeros(max_num_seqs, _I64)
        self._top_p = np.ones(max_num_seqs, np.float32)
        self._seed = np.zeros(max_num_seqs, _I64)
        self._greedy = np.ones(max_num_seqs, np.bool_)
        self._filter = np.zeros(max_num_seqs, np.bool_)
        self._logprobs = np.zeros(max_num_seqs, np.bool_)
        self._top = np.zeros(max_num_seqs, _I64)  # top_logprobs
        self._special = np.zeros(max_num_seqs, np.bool_)  # penalized or constrained: the per-row pass below
        self._penalized = np.zeros(max_num_seqs, np.bool_)
        self._penalties = np.zeros((3, max_num_seqs), np.float32)  # presence, frequency, repetition
        self._min_tokens = np.zeros(max_num_seqs, _I64)
        self._grammar: list[object | None] = [None] * max_num_seqs
        self._setups: list[SlotSetup] = []  # adopted since the last batch was built
        self._arange = np.arange(max(max_num_seqs, 1) + 1, dtype=_I64)
        self._ones = np.ones(max_num_seqs, _I64)
        self._zeros = np.zeros(max_num_seqs, _I64)
        self._rows_of: tuple[int, np.ndarray, tuple] | None = None  # (composition, slots, flags) of the last step

    def culprits(self, step: ScheduledStep) -> list[tuple[object, Exception]]:
        """After building ``step`` raised: the rows that fail when built alone, with their errors. Leaves the
        builder as if nothing had been sent (the trial builds noted table entries that no step will carry)."""
        out = []
        owners = list(self._owner)  # trial builds adopt slots for batches that never launch: undone below
        for i, seq in enumerate(step.seqs):
            row = slice(i, i + 1)
            tokens = 1 if step.num_steps > 1 else int(step.counts[i])
            alone = ScheduledStep(
                step.step_id, [seq], step.starts[row], step.counts[row], step.sample[row], tokens, step.num_steps
            )
            try:
                self.build(alone)
            except Exception as exc:
                out.append((seq, exc))
        self._owner = [o if o is owners[i] else None for i, o in enumerate(self._owner)]
        self._setups = []
        self.invalidate()
        return out

    def invalidate(self) -> None:
        """Forget what the device was told: the next step resends every row's table. Called when a step failed or
        was never launched (its table diffs may not have reached the device)."""
        self._synced_list = [None] * len(self._synced_list)
        self._synced_len = [0] * len(self._synced_len)
        self._rows_of = None

    def build(self, step: ScheduledStep) -> StepBatch:
        reuse = self._rows_of is not None and step.composition >= 0 and step.composition == self._rows_of[0]
        try:
            batch = self._decode(step) if reuse else self._general(step)
        except BaseException:
            for setup in self._setups:  # this step is never launched: adopt those slots again next time
                self._owner[setup.slot] = None
            self._setups = []
            raise
        if step.num_steps > 1:
            batch.counts = step.counts
        if self._setups:
            batch.setups, self._setups = self._setups, []
        return batch

    # -- the steady state: same rows as the last step, one decode each -------------------------------------------

    def _decode(self, step: ScheduledStep) -> StepBatch:
        _, slots, (greedy, needs_filter, logprobs, special) = self._rows_of
        b = len(slots)
        updates = self._diffs(step.seqs, step.grown)
        positions = step.starts
        seq_lens = positions + 1
        rows = self._arange[:b]
        batch = self._batch(
            step, self._zeros[:b], self._ones[:b], rows, positions, slots, seq_lens, self._arange[: b + 1], rows,
            slots, seq_lens, updates, greedy, needs_filter, logprobs,
        )  # fmt: skip
        if special is not None:
            batch.processing, batch.grammar_rows, batch.top_logprobs = special
        return batch

    # -- any step ------------------------------------------------------------------------------------------------

    def _general(self, step: ScheduledStep) -> StepBatch:
        seqs = step.seqs
        starts, counts = step.starts, step.counts
        b = len(seqs)
        slot_l = [s.slot for s in seqs]
        for seq, slot in zip(seqs, slot_l):
            if self._owner[slot] is not seq:
                self._adopt(slot, seq)
        ids: list[int] = []
        from_device: list[int] = []
        for seq, start, n in zip(seqs, starts.tolist(), counts.tolist() if step.num_steps == 1 else [1] * b):
            end = start + n
            known = len(seq.token_ids)
            if end <= known:
                ids.extend(seq.token_ids[start:end])
                from_device.extend([0] * n)
            else:  # the last position is a sample still on the device (overlap) — at most one token
                ids.extend(seq.token_ids[start:known])
                ids.append(0)
                from_device.extend([0] * (known - start))
                from_device.append(1)
        counts1 = counts if step.num_steps == 1 else np.ones(b, _I64)
        qsl = np.zeros(b + 1, _I64)
        np.cumsum(counts1, out=qsl[1:])
        total = int(qsl[-1])
        token_rows = np.repeat(self._arange[:b], counts1)
        positions = np.arange(total, dtype=_I64) - qsl[:-1][token_rows] + starts[token_rows]
        seq_lens = starts + counts1
        slots = np.array(slot_l, _I64)
        rows = np.flatnonzero(step.sample) if not step.sample.all() else self._arange[:b]
        greedy = bool(self._greedy[slots[rows]].all())
        needs_filter = bool(self._filter[slots[rows]].any())
        logprobs = bool(self._logprobs[slots[rows]].any())
        special = self._special_rows(slots[rows]) if self._special[slots[rows]].any() else None
        decode_only = total == b and bool(step.sample.all())
        self._rows_of = (step.composition, slots, (greedy, needs_filter, logprobs, special)) if decode_only else None
        batch = self._batch(
            step, np.array(ids, _I64), np.array(from_device, _I64), token_rows, positions, slots, seq_lens, qsl,
            rows, slots[rows], seq_lens[rows], self._diffs(seqs, None), greedy, needs_filter, logprobs,
            sample_idx=qsl[1:][rows] - 1,
        )  # fmt: skip
        if special is not None:
            batch.processing, batch.grammar_rows, batch.top_logprobs = special
        return batch

    def _special_rows(self, sample_slots: np.ndarray) -> tuple[StepProcessing | None, list | None, int]:
        """The per-row extras of a step's sampling rows (their slots): processing, grammar rows, top logprobs."""
        processing = None
        pen = np.flatnonzero(self._penalized[sample_slots])
        if pen.size:
            slots = sample_slots[pen]
            floats = np.ascontiguousarray(self._penalties[:, slots])
            min_tokens = self._min_tokens[slots]
            processing = StepProcessing(
                ints=np.stack([pen, slots, min_tokens]),
                floats=floats,
                use_counts=bool(floats[:2].any()),
                use_repetition=bool((floats[2] != 1.0).any()),
                use_bias=any(self._owner[s].params.logit_bias for s in slots.tolist()),
                use_min_tokens=bool(min_tokens.any()),
            )
        grammar = self._grammar
        rows = [(r, grammar[s]) for r, s in enumerate(sample_slots.tolist()) if grammar[s] is not None]
        return processing, rows or None, int(self._top[sample_slots].max())

    def _batch(
        self, step, ids, from_device, token_rows, positions, slots, seq_lens, qsl, rows, sample_slots,
        sample_positions, updates, greedy, needs_filter, logprobs, sample_idx=None,
    ) -> StepBatch:  # fmt: skip
        if greedy:  # never read: no per-row parameter travels
            temperature = top_k = top_p = seeds = _EMPTY
        else:
            temperature, top_k = self._temperature[sample_slots], self._top_k[sample_slots]
            top_p, seeds = self._top_p[sample_slots], self._seed[sample_slots]
        return StepBatch(
            step=step, input_ids=ids, from_device=from_device, token_rows=token_rows, positions=positions,
            slots=slots, seq_lens=seq_lens, query_start_loc=qsl,
            sample_idx=rows if sample_idx is None else sample_idx, sample_slots=sample_slots,
            sample_positions=sample_positions, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
            table_slots=updates[0], table_cols=updates[1], table_blocks=updates[2],
            all_greedy=greedy, needs_filter=needs_filter, needs_logprobs=logprobs,
        )  # fmt: skip

    def _adopt(self, slot: int, seq) -> None:
        """A sequence took this slot: record its sampling parameters once, for every step it runs in."""
        p = seq.params
        self._temperature[slot] = p.temperature
        self._top_k[slot] = p.top_k
        self._top_p[slot] = p.top_p
        self._seed[slot] = seq.seed
        self._greedy[slot] = p.temperature == 0.0
        self._filter[slot] = p.top_k > 0 or p.top_p < 1.0
        self._logprobs[slot] = p.logprobs
        self._top[slot] = p.top_logprobs
        grammar = seq.grammar
        self._grammar[slot] = grammar
        penalized = p.penalized
        self._penalized[slot] = penalized
        self._special[slot] = penalized or grammar is not None or p.top_logprobs > 0
        if penalized:
            self._penalties[:, slot] = (p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
            self._min_tokens[slot] = p.min_tokens
            self._setups.append(
                SlotSetup(
                    slot,
                    seq.token_ids[seq.num_prompt :],
                    seq.token_ids[: seq.num_prompt] if p.repetition_penalty != 1.0 else None,
                    p.logit_bias,
                    sorted(seq.stop_ids) if p.min_tokens else None,
                )
            )
        self._owner[slot] = seq  # last: a value that failed above leaves the slot unowned, so that `culprits`,
        # building each row alone, finds the request it came from instead of failing the whole step

    def _diffs(self, seqs: list, rows: list[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block-table entries the device lacks, for ``rows`` of ``seqs`` (``None``: check every row)."""
        t_slots: list[int] = []
        t_cols: list[int] = []
        t_blocks: list[int] = []
        synced_list, synced_len = self._synced_list, self._synced_len
        for seq in seqs if rows is None else [seqs[i] for i in rows]:
            slot, table = seq.slot, seq.block_table
            if synced_list[slot] is not table:  # a new owner of the slot (or a preempted sequence's new table)
                synced_list[slot] = table
                synced_len[slot] = 0
            done = synced_len[slot]
            n = len(table)
            if done < n:
                t_slots.extend([slot] * (n - done))
                t_cols.extend(range(done, n))
                t_blocks.extend(table[done:])
                synced_len[slot] = n
        if not t_slots:
            return _EMPTY, _EMPTY, _EMPTY
        return np.array(t_slots, _I64), np.array(t_cols, _I64), np.array(t_blocks, _I64)
