"""Batch preparation: turn a :class:`~acb.scheduler.ScheduledStep` into the host arrays of one model step.

Everything here is numpy on the host; the runner moves it to the device. Per-sequence Python work is limited to
reading each entry's few scalars and, for prompt chunks, slicing its token list; positions, cache slots and
sequence offsets are computed with array operations. Block tables live in a persistent per-slot array that is only
written where a sequence gained blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scheduler import ScheduledStep

__all__ = ["StepBatch", "BatchBuilder"]


@dataclass(slots=True)
class StepBatch:
    """Host-side inputs of one step (numpy), ready for :meth:`acb.runner.ModelRunner.launch`."""

    step: ScheduledStep
    input_ids: np.ndarray  # [T] int64; entries at device_idx are filled on the device
    positions: np.ndarray  # [T] int64
    device_idx: np.ndarray  # [Nd] packed indices whose input is the previous sample of a sequence
    device_slots: np.ndarray  # [Nd] which token-buffer slot holds it
    slot_mapping: np.ndarray  # [T] int64 flat KV-cache slot per token
    query_start_loc: np.ndarray  # [B + 1] int64
    seq_lens: np.ndarray  # [B] int64
    block_tables: np.ndarray  # [B, max_blocks] int64
    sample_idx: np.ndarray  # [S] packed indices whose logits are sampled
    sample_slots: np.ndarray  # [S] token-buffer slot of each sampled sequence
    sample_positions: np.ndarray  # [S] position the sampled token will take (drives the seeded RNG)
    temperature: np.ndarray  # [S] float32
    top_k: np.ndarray  # [S] int64 (0 = off)
    top_p: np.ndarray  # [S] float32
    seeds: np.ndarray  # [S] int64
    all_greedy: bool
    needs_filter: bool  # some request uses top-k or top-p
    needs_logprobs: bool

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def decode_only(self) -> bool:
        return len(self.input_ids) == len(self.seq_lens)


class BatchBuilder:
    """Builds :class:`StepBatch` objects; owns the per-slot block-table array."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int) -> None:
        self.block_size = block_size
        self._tables = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int64)
        # per slot: the block list last copied into its row, and how much of it (Python lists: read per entry, per step)
        self._synced_len = [0] * max_num_seqs
        self._synced_list: list[list[int] | None] = [None] * max_num_seqs

    def build(self, step: ScheduledStep) -> StepBatch:
        entries = step.entries
        nseq = len(entries)
        slot_l: list[int] = []
        start_l: list[int] = []
        count_l: list[int] = []
        synced_list, synced_len = self._synced_list, self._synced_len
        ids: list[int] = []
        device_idx: list[int] = []
        device_slots: list[int] = []
        s_rows: list[int] = []
        s_temp: list[float] = []
        s_topk: list[int] = []
        s_topp: list[float] = []
        s_seed: list[int] = []
        want_logprobs = False

        offset = 0
        for i, e in enumerate(entries):
            seq = e.seq
            slot = seq.slot
            slot_l.append(slot)
            start_l.append(e.start)
            count_l.append(e.num_tokens)
            table = seq.block_table
            if synced_list[slot] is not table or synced_len[slot] != len(table):
                self._sync_table(slot, table)
            end = e.start + e.num_tokens
            known = len(seq.token_ids)
            if end <= known:
                ids.extend(seq.token_ids[e.start : end])
            else:  # the last position is a sample still on the device (overlap) — at most one token
                ids.extend(seq.token_ids[e.start : known])
                ids.append(0)
                device_idx.append(offset + e.num_tokens - 1)
                device_slots.append(slot)
            offset += e.num_tokens
            if e.sample:
                p = seq.params
                s_rows.append(i)
                s_temp.append(p.temperature)
                s_topk.append(p.top_k)
                s_topp.append(p.top_p)
                s_seed.append(seq.seed)
                want_logprobs |= p.logprobs

        slots = np.array(slot_l, dtype=np.int64)
        starts = np.array(start_l, dtype=np.int64)
        counts = np.array(count_l, dtype=np.int64)
        qsl = np.zeros(nseq + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        total = int(qsl[-1])
        seq_of_token = np.repeat(np.arange(nseq), counts)
        positions = np.arange(total, dtype=np.int64) - qsl[:-1][seq_of_token] + starts[seq_of_token]
        token_slots = slots[seq_of_token]
        bs = self.block_size
        slot_mapping = self._tables[token_slots, positions // bs] * bs + positions % bs
        seq_lens = starts + counts
        max_blocks = int(-(-seq_lens.max() // bs))
        block_tables = self._tables[slots, :max_blocks]

        rows = np.asarray(s_rows, dtype=np.int64)
        temperature = np.asarray(s_temp, dtype=np.float32)
        top_k = np.asarray(s_topk, dtype=np.int64)
        top_p = np.asarray(s_topp, dtype=np.float32)
        return StepBatch(
            step=step,
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=positions,
            device_idx=np.asarray(device_idx, dtype=np.int64),
            device_slots=np.asarray(device_slots, dtype=np.int64),
            slot_mapping=slot_mapping,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=block_tables,
            sample_idx=qsl[1:][rows] - 1,
            sample_slots=slots[rows],
            sample_positions=seq_lens[rows],
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seeds=np.asarray(s_seed, dtype=np.int64),
            all_greedy=bool((temperature == 0).all()),
            needs_filter=bool(((top_k > 0) | (top_p < 1.0)).any()),
            needs_logprobs=want_logprobs,
        )

    def _sync_table(self, slot: int, table: list[int]) -> None:
        """Copy the blocks a sequence gained since the last step into its slot's row."""
        if self._synced_list[slot] is not table:  # a new owner of the slot (or a preempted sequence's new table)
            self._synced_list[slot] = table
            self._synced_len[slot] = 0
        done = self._synced_len[slot]
        if done < len(table):
            self._tables[slot, done : len(table)] = table[done:]
            self._synced_len[slot] = len(table)
