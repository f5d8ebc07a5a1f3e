"""The one way a step's inputs reach the device, for every path (lean eager, generic, CUDA graphs).

The host packs a :class:`~acb.batch.StepBatch` into a pinned staging buffer (two, alternating, so the host fills one
while the copy from the other may still be in flight) and one host-to-device copy lands it in a device buffer with
the same layout. Decode steps that replay a CUDA graph use the *fixed* layout, whose regions are sized for the
largest graph and whose views are the static inputs the graphs were captured on; other steps use a *compact* layout
sized to the step, so that their copy carries nothing but the step.

The device owns each sequence slot's block table (``tables [slots + 1, max_blocks]``, the last row a scratch row for
graph padding). A step carries only the table entries written since the last one; the device applies them, then
derives what the kernels read: input ids (the host's, or a row's previous sample from the token buffer), each row's
block table, and each token's KV-cache slot. The same derivation runs eagerly and inside the graphs: one Triton kernel
on CUDA (:mod:`acb.kernels.step`), torch on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batch import StepBatch
from .lean_model import LeanInputs

__all__ = ["StepInputs", "DeviceStep", "step_indices_torch"]

# int64 regions, by size class: per token (T), per row (B), per row + 1, per sampled row (S), per table update (U)
_TOKEN = ("host_ids", "from_device", "token_rows", "positions")
_ROW = ("slots", "seq_lens", "counts")  # counts: a round's sub-steps per row
_SAMPLE = ("sample_idx", "sample_slots", "sample_positions", "top_k", "seeds", "temperature", "top_p")
_FLOATS = ("temperature", "top_p")  # float32, stored in the first half of their int64 region


@dataclass(slots=True)
class DeviceStep:
    """A staged step's device tensors (views of the device buffer; derived ones computed from them)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    seq_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]
    query_start_loc: torch.Tensor  # [B + 1]
    sample_idx: torch.Tensor  # [S]
    sample_slots: torch.Tensor  # [S]
    sample_positions: torch.Tensor  # [S]
    temperature: torch.Tensor  # [S] float32
    top_k: torch.Tensor  # [S]
    top_p: torch.Tensor  # [S] float32
    seeds: torch.Tensor  # [S]

    def lean_inputs(self, max_query_len: int, decode_splits: int, logits: bool, meta=None) -> LeanInputs:
        """The lean forward's view of this step (``logits``: only the sampled rows' logits, else every row's)."""
        return LeanInputs(
            input_ids=self.input_ids,
            positions=self.positions,
            slot_mapping=self.slot_mapping,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            query_start_loc=self.query_start_loc,
            max_query_len=max_query_len,
            logits_idx=self.sample_idx if logits else None,
            decode_splits=decode_splits,
            meta=meta,
        )


class StepInputs:
    def __init__(
        self,
        *,
        max_tokens: int,
        max_rows: int,
        graph_rows: int,
        num_slots: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        token_buf: torch.Tensor,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.scratch_slot = num_slots  # the tables' and the token buffer's spare row
        self.token_buf = token_buf
        self.cuda = device.type == "cuda"
        if self.cuda:  # one Triton kernel where torch launches ten, inside every decode graph
            from .kernels.step import step_indices

            self._indices = step_indices
        else:
            self._indices = step_indices_torch
        self.capacity = (max_tokens, max_rows)
        size = _layout(max_tokens, max_rows, max_rows)[1]
        self.tables = torch.full((num_slots + 1, max_blocks), scratch_block, dtype=torch.int64, device=device)
        self._dev = torch.zeros(size, dtype=torch.int64, device=device)
        if self.cuda:
            self._stage = [torch.zeros(size, dtype=torch.int64).pin_memory() for _ in range(2)]
            self._copied: list | None = [torch.cuda.Event(), torch.cuda.Event()]
        else:  # the CPU computes from the staging buffer itself
            self._stage = [self._dev]
            self._copied = None
        self._turn = 0
        self._np = [buf.numpy() for buf in self._stage]
        # the graphs' layout: fixed regions, made once (host views of both staging buffers, device views)
        self.fixed, self._fixed_end = _layout(graph_rows, graph_rows, graph_rows)
        # Block-table entries travel in a buffer of their own, grown on demand: a step that starts long prompts
        # found in the prefix cache (or resends every table after a failure) carries thousands.
        self._updates = _Updates(self.cuda, self.tables.device)
        self._fixed_host = [_views(buf, self.fixed, np.float32) for buf in self._np]
        self.fixed_views = _views(self._dev, self.fixed, torch.float32)
        for host in self._fixed_host:  # padding rows: a scratch slot no sequence owns, an empty context
            host["counts"][:] = 0
            host["slots"][:] = self.scratch_slot
            host["sample_slots"][:] = self.scratch_slot
            host["seq_lens"][:] = 1
            host["token_rows"][:] = np.arange(graph_rows)
            host["sample_idx"][:] = np.arange(graph_rows)
        if self.cuda:
            self._dev[: self._fixed_end].copy_(self._stage[0][: self._fixed_end])

    # -- staging ----------------------------------------------------------------------------------------------------

    def stage(
        self, b: StepBatch, graph_rows: int = 0, start: torch.cuda.Event | None = None
    ) -> dict[str, torch.Tensor]:
        """Pack ``b`` into a staging buffer, start its copy to the device, apply its block-table entries, and return
        the device views of its fields.

        ``graph_rows`` > 0: a decode step replayed by the graph of that many rows; it uses the fixed layout, and rows
        ``len(b) .. graph_rows`` are padding that reads and writes only the scratch slot. ``start`` (step timing) is
        recorded right before the step's first GPU work, after the host filled the staging buffer, so that host time
        never counts as GPU time."""
        t, n, s = b.num_tokens, b.num_rows, len(b.sample_idx)
        if t > self.capacity[0] or n > self.capacity[1]:
            raise RuntimeError(f"a step of {t} tokens and {n} rows exceeds the staging buffer {self.capacity}")
        k = self._turn
        if self._copied is not None:
            self._turn ^= 1
            self._copied[k].synchronize()  # the copy that last read this staging buffer is done (practically always)
        if graph_rows:
            layout, end, h = self.fixed, self._fixed_end, self._fixed_host[k]
        else:
            layout, end = _layout(t, n, s)
            h = _views(self._np[k], layout, np.float32)
        h["host_ids"][:t] = b.input_ids
        h["from_device"][:t] = b.from_device
        h["token_rows"][:t] = b.token_rows
        h["positions"][:t] = b.positions
        h["slots"][:n] = b.slots
        h["seq_lens"][:n] = b.seq_lens
        if b.counts is not None:
            h["counts"][:n] = b.counts
            h["sub_step"][0] = 0
        h["query_start_loc"][: n + 1] = b.query_start_loc
        h["sample_idx"][:s] = b.sample_idx
        h["sample_slots"][:s] = b.sample_slots
        h["sample_positions"][:s] = b.sample_positions
        if not b.all_greedy:
            h["temperature"][:s] = b.temperature
            h["top_k"][:s] = b.top_k
            h["top_p"][:s] = b.top_p
            h["seeds"][:s] = b.seeds
        if graph_rows > n:  # restore the padding that a larger step overwrote
            pad = slice(n, graph_rows)
            h["host_ids"][pad] = 0
            h["from_device"][pad] = 0
            h["token_rows"][pad] = np.arange(n, graph_rows)
            h["positions"][pad] = 0
            h["slots"][pad] = self.scratch_slot
            h["seq_lens"][pad] = 1
            h["counts"][pad] = 0
            h["sample_idx"][pad] = np.arange(n, graph_rows)
            h["sample_slots"][pad] = self.scratch_slot
        if start is not None:
            start.record()
        if self._copied is not None:
            self._dev[:end].copy_(self._stage[k][:end], non_blocking=True)
            self._copied[k].record()
        if len(b.table_slots):
            self.apply_updates(self._updates.stage(b.table_slots, b.table_cols, b.table_blocks))
        return self.fixed_views if graph_rows else _views(self._dev, layout, torch.float32)

    def apply_updates(self, entries: torch.Tensor) -> None:
        """Write block-table entries ``[u, 3]`` (slot, column, block) on the device. Rank 0 stages them with the
        step; a tensor-parallel worker receives the same tensor (:meth:`staged_updates`) and applies it here."""
        self.tables[entries[:, 0], entries[:, 1]] = entries[:, 2]

    def staged_updates(self, count: int) -> torch.Tensor:
        """The ``[count, 3]`` entries the last :meth:`stage` put on the device."""
        return self._updates.staged(count)

    @property
    def fixed_end(self) -> int:
        """Where the graphs' fixed region ends in the device buffer."""
        return self._fixed_end

    def region(self, end: int) -> torch.Tensor:
        """The device buffer's first ``end`` elements: a staged step's region (what tensor-parallel ranks share)."""
        return self._dev[:end]

    def compact(self, t: int, n: int, s: int) -> tuple[dict[str, torch.Tensor], int]:
        """The device views of a compactly staged step of that size, and where its region ends (tensor-parallel
        workers receive rank 0's staged region and read it through these)."""
        layout, end = _layout(t, n, s)
        return _views(self._dev, layout, torch.float32), end

    def advance(self, v: dict[str, torch.Tensor], n: int) -> None:
        """Turn a staged decode step of ``n`` rows into the next sub-step of its round, on the device: every row
        moves one position on and reads its previous sample; a row whose round is over (its ``counts`` reached)
        becomes padding on the scratch slot. Captured inside the round graphs, so a round needs no host work between
        its sub-steps."""
        j = v["sub_step"]
        j.add_(1)
        done = v["counts"][:n] <= j
        slots, sample_slots = v["slots"][:n], v["sample_slots"][:n]
        positions, seq_lens, sample_positions = v["positions"][:n], v["seq_lens"][:n], v["sample_positions"][:n]
        slots.masked_fill_(done, self.scratch_slot)
        sample_slots.masked_fill_(done, self.scratch_slot)
        positions.add_(1).masked_fill_(done, 0)
        seq_lens.add_(1).masked_fill_(done, 1)
        sample_positions.add_(1)
        v["from_device"][:n].fill_(1)

    # -- what the kernels read ----------------------------------------------------------------------------------

    def derive(self, v: dict[str, torch.Tensor], t: int, n: int, s: int) -> DeviceStep:
        """The device tensors of a staged step of ``t`` tokens, ``n`` rows and ``s`` sampled rows, from its views
        (the same code runs inside the decode graphs, on padded sizes)."""
        positions = v["positions"][:t]
        input_ids, slot_mapping, block_tables = self._indices(
            v["host_ids"][:t], v["from_device"][:t], v["token_rows"][:t], positions, v["slots"][:n], self.token_buf,
            self.tables, self.block_size,
        )  # fmt: skip
        return DeviceStep(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            seq_lens=v["seq_lens"][:n],
            block_tables=block_tables,
            query_start_loc=v["query_start_loc"][: n + 1],
            sample_idx=v["sample_idx"][:s],
            sample_slots=v["sample_slots"][:s],
            sample_positions=v["sample_positions"][:s],
            temperature=v["temperature"][:s],
            top_k=v["top_k"][:s],
            top_p=v["top_p"][:s],
            seeds=v["seeds"][:s],
        )


def step_indices_torch(
    host_ids: torch.Tensor,
    from_device: torch.Tensor,
    token_rows: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    token_buf: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, slot_mapping, block_tables)`` of a step, in torch: the CPU's version of
    :func:`acb.kernels.step.step_indices` (which says what each is), and its reference."""
    token_slots = slots[token_rows]
    input_ids = torch.where(from_device.bool(), token_buf[token_slots], host_ids)
    slot_mapping = tables[token_slots, positions // block_size] * block_size + positions % block_size
    return input_ids, slot_mapping, tables[slots]


_ALIGN = 2  # int64 elements: every field starts on a 16-byte boundary


def _layout(t: int, n: int, s: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Field regions ``name -> (offset, size)`` for a step of that many tokens, rows and samples, small fields
    first; and the end of the last one.

    Each field starts 16-byte aligned. Triton compiles a kernel variant per alignment of its pointer arguments
    (16 bytes or not), and the kernels read fields in place (sequence lengths, query starts, positions): packed
    back to back, a field's alignment would follow the parity of the step's sizes, so that a batch of an even
    number of sequences and one of an odd number would each compile their own variants, the first time at the
    first real step of that parity (a cold-start stall the warm-up could not cover)."""
    out, off = {}, 0
    for names, size in ((("sub_step",), 1), (_ROW, n), (("query_start_loc",), n + 1), (_SAMPLE, s), (_TOKEN, t)):
        for name in names:
            off = -(-off // _ALIGN) * _ALIGN
            out[name] = (off, size)
            off += size
    return out, off


def _views(buf, layout: dict[str, tuple[int, int]], float_dtype) -> dict:
    """Views of ``buf`` (numpy or torch int64) per field; float fields reinterpret the first half of their region."""
    out = {}
    for name, (off, size) in layout.items():
        v = buf[off : off + size]
        out[name] = v.view(float_dtype)[:size] if name in _FLOATS else v
    return out


class _Updates:
    """Staging for block-table entries ``(slot, column, block)``: two pinned buffers and a device buffer (CUDA), each
    doubled when a step carries more entries than they hold. Each step's entries are copied once, packed."""

    def __init__(self, cuda: bool, device: torch.device, capacity: int = 4096) -> None:
        self.cuda, self.device = cuda, device
        self._turn = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        if self.cuda:
            self._host = [torch.zeros(capacity, 3, dtype=torch.int64).pin_memory() for _ in range(2)]
            self._dev = torch.zeros(capacity, 3, dtype=torch.int64, device=self.device)
            self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        else:
            self._host = [torch.zeros(capacity, 3, dtype=torch.int64)]
            self._dev = self._host[0]
            self._copied = None

    def stage(self, slots: np.ndarray, cols: np.ndarray, blocks: np.ndarray) -> torch.Tensor:
        """These entries on the device, ``[u, 3]`` (valid for this step's work on the stream)."""
        u = len(slots)
        if u > self.capacity:
            if self.cuda:
                torch.cuda.current_stream().synchronize()  # the old buffers may still be read by queued copies
            self._alloc(max(u, 2 * self.capacity))
        k = 0
        if self._copied is not None:
            k, self._turn = self._turn, self._turn ^ 1
            self._copied[k].synchronize()
        host = self._host[k].numpy()
        host[:u, 0], host[:u, 1], host[:u, 2] = slots, cols, blocks
        dev = self._dev[:u]  # entries are rows of a [capacity, 3] buffer: the used part is contiguous
        if self._copied is not None:
            dev.copy_(self._host[k][:u], non_blocking=True)
            self._copied[k].record()
        return dev

    def staged(self, count: int) -> torch.Tensor:
        return self._dev[:count]
