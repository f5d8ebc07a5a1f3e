"""CUDA graphs for decode steps: one replay per step instead of hundreds of kernel launches.

One graph per batch-size bucket, captured at start-up over static device buffers. A decode step of ``B`` sequences
replays the smallest bucket ``>= B``; padding rows write their KV to a scratch block no sequence owns and attend
to it alone.

Inputs travel in one host-to-device copy: the host packs every input of the step into a pinned staging buffer
(two of them, alternating, so the host can fill one while the copy from the other may still be in flight), and the
static device buffers are views of one contiguous device tensor with the same layout. Input ids are selected on
the device: a position whose token the host has not seen yet (overlap) is read from the runner's token buffer.

Greedy sampling is part of the graph: it takes each row's argmax and writes it to the token buffer at the row's
``out_slots`` entry. A step whose rows all sample greedily (no logprobs) points them at their sequences' slots and
is then one copy, one replay and one copy back; any other step points every row at the token buffer's last entry,
a scratch slot no sequence owns, and samples from the graph's logits outside it.
"""

from __future__ import annotations

import torch

from .batch import StepBatch
from .kernels import decode_splits
from .lean_model import LeanCausalLM, LeanInputs
from .sampling import flag_non_finite

__all__ = ["DecodeGraphs", "graph_buckets"]

_FIELDS = ("host_ids", "from_device", "src_slots", "positions", "slot_mapping", "seq_lens", "out_slots")


def graph_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128] + list(range(160, 1025, 32))
    out = [s for s in sizes if s < max_batch]
    return out + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        lean: LeanCausalLM,
        token_buf: torch.Tensor,
        max_batch: int,
        max_blocks: int,
        scratch_block: int,
        block_size: int,
        max_model_len: int,
    ) -> None:
        self.lean = lean
        self.max_batch = max_batch
        self.width = max_blocks
        self.buckets = graph_buckets(max_batch)
        n = max_batch
        self._sizes = [n] * len(_FIELDS) + [n * max_blocks]
        total = sum(self._sizes)
        dev = lean.device
        self._dev = torch.zeros(total, dtype=torch.int64, device=dev)
        self._stage = [torch.zeros(total, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0
        views, off = {}, 0
        for name, size in zip((*_FIELDS, "block_tables"), self._sizes):
            views[name] = (off, size)
            off += size
        self._views = views
        # numpy views of each staging buffer's fields, made once: the host fills them every decode step
        self._stage_views = [
            {name: buf.numpy()[off : off + size] for name, (off, size) in views.items()} for buf in self._stage
        ]
        d = self._device_views(self._dev)
        self.scratch_slot = scratch_block * block_size
        self.scratch_token_slot = token_buf.numel() - 1  # the token buffer's spare entry (see the module doc)
        # Safe values for padding rows, in both staging buffers and on the device.
        for buf in (*self._stage, self._dev):
            v = self._device_views(buf)
            v["out_slots"].fill_(self.scratch_token_slot)
            v["slot_mapping"].fill_(self.scratch_slot)
            v["seq_lens"].fill_(1)
            v["block_tables"].fill_(scratch_block)
        self._scratch_block = scratch_block
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._capture(d, token_buf, max_model_len)

    def _device_views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (off, size) in self._views.items():
            t = buf[off : off + size]
            out[name] = t.view(self.max_batch, self.width) if name == "block_tables" else t
        return out

    def _inputs(self, d: dict[str, torch.Tensor], token_buf: torch.Tensor, b: int, splits: int) -> LeanInputs:
        ids = torch.where(d["from_device"][:b].bool(), token_buf[d["src_slots"][:b]], d["host_ids"][:b])
        return LeanInputs(
            input_ids=ids,
            positions=d["positions"][:b],
            slot_mapping=d["slot_mapping"][:b],
            seq_lens=d["seq_lens"][:b],
            block_tables=d["block_tables"][:b],
            query_start_loc=None,
            max_query_len=1,
            logits_idx=None,
            decode_splits=splits,
        )

    def _capture(self, d, token_buf, max_model_len: int) -> None:
        kv_heads = self.lean.num_kv_heads
        sms = torch.cuda.get_device_properties(self.lean.device).multi_processor_count
        self.splits = {b: decode_splits(b, kv_heads, max_model_len, sms) for b in self.buckets}
        for b in sorted(set(self.splits.values())):  # compile each kernel variant before capture
            size = max(x for x in self.buckets if self.splits[x] == b)
            self.lean.forward(self._inputs(d, token_buf, size, b))
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.lean.forward(self._inputs(d, token_buf, b, self.splits[b]))
                greedy = logits.argmax(-1)  # as sampling.sample's greedy rows (bf16 -> fp32 keeps the order)
                token_buf[d["out_slots"][:b]] = greedy
                tokens = flag_non_finite(logits, greedy, greedy)  # -1 where the logits are not finite
            self.graphs[b] = (graph, logits, tokens)
        torch.cuda.synchronize()

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} larger than the largest graph ({self.max_batch})")

    def run(
        self, batch: StepBatch, start: torch.cuda.Event | None = None, greedy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph for a decode-only ``batch``; returns ``(logits [B, vocab], greedy tokens [B])`` (views,
        valid until the next replay of that bucket; a token is -1 where its row's logits are not finite). With
        ``greedy`` (every row samples greedily) the tokens are also written to the token buffer at the rows' sample
        slots. ``start`` (step timing) is recorded just before
        the step's first GPU work, after the host filled the staging buffer, so that host time never counts as GPU
        time."""
        n = len(batch.seq_lens)
        bp = self.bucket(n)
        k = self._turn
        self._turn ^= 1
        self._copied[k].synchronize()  # the copy that last read this staging buffer is done (practically always)
        v = self._stage_views[k]
        v["host_ids"][:n] = batch.input_ids
        fd = v["from_device"]
        fd[:bp] = 0
        fd[batch.device_idx] = 1
        v["src_slots"][:n] = 0
        v["src_slots"][batch.device_idx] = batch.device_slots
        v["positions"][:n] = batch.positions
        v["positions"][n:bp] = 0
        v["slot_mapping"][:n] = batch.slot_mapping
        v["slot_mapping"][n:bp] = self.scratch_slot
        v["seq_lens"][:n] = batch.seq_lens
        v["seq_lens"][n:bp] = 1
        out = v["out_slots"]
        if greedy:
            out[:n] = batch.sample_slots
            out[n:bp] = self.scratch_token_slot
        else:
            out[:bp] = self.scratch_token_slot
        bt = v["block_tables"].reshape(self.max_batch, self.width)
        w = batch.block_tables.shape[1]
        bt[:n, :w] = batch.block_tables
        bt[n:bp, 0] = self._scratch_block
        end = self._views["block_tables"][0] + bp * self.width
        if start is not None:
            start.record()
        self._dev[:end].copy_(self._stage[k][:end], non_blocking=True)
        self._copied[k].record()
        graph, logits, tokens = self.graphs[bp]
        graph.replay()
        return logits[:n], tokens[:n]
