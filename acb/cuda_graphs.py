"""CUDA graphs for decode steps: one replay per step instead of hundreds of kernel launches.

One graph per batch-size bucket, captured at start-up on the fixed layout of :class:`~acb.step_inputs.StepInputs`:
the graph reads the staged fields, derives input ids, block tables and cache slots on the device, runs the model's
forward (the lean model's, or the generic path's: transformers' modules with acb's kernels), and samples greedily
(each row's argmax, :func:`acb.kernels.fused.argmax_into`, written to the token buffer at the row's slot). A decode
step of ``B`` sequences is staged padded to the smallest bucket ``>= B``; padding rows use a scratch slot whose block
table is a scratch block no sequence owns.

A step whose rows all sample greedily (no logprobs) is then one copy, one replay and one copy back; any other step
samples from the graph's logits outside it, and its sampler overwrites the greedy tokens in the token buffer.

Each bucket has a second graph for the later sub-steps of a multi-step round: it first advances the staged inputs
by one position on the device (:meth:`~acb.step_inputs.StepInputs.advance`), then runs the same step. A round is one
copy and one replay per sub-step, queued back to back with no host work in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .kernels import decode_splits
from .step_inputs import DeviceStep, StepInputs

__all__ = ["DecodeGraphs", "DecodeForward", "graph_buckets", "graph_rows"]

DecodeForward = Callable[[DeviceStep, int], torch.Tensor]
"""A decode step's forward: ``(step, decode_splits) -> logits [rows, vocab]``, reading only device tensors."""


GRAPH_ROWS_MAX = 1024
"""Decode steps of more rows run eagerly. Up to here a graph pays: an eager step's launches cost the host tens of ms,
about what the GPU needs for 1,000 rows (measured on an H200: 44 ms per eager step of 513-1,024 rows)."""


def graph_rows(max_num_seqs: int) -> int:
    """The largest decode batch captured for an engine of ``max_num_seqs`` sequences (larger steps run eagerly)."""
    return min(max_num_seqs, GRAPH_ROWS_MAX)


def graph_buckets(max_batch: int) -> list[int]:
    """Bucket sizes up to ``max_batch``: fine where a step is bound by reading the weights (padding is nearly free
    there but each bucket costs a capture), coarser above 512 rows where padding costs compute in proportion."""
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128] + list(range(160, 513, 32)) + list(range(576, 1025, 64))
    out = [s for s in sizes if s < max_batch]
    return out + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        forward: DecodeForward,
        inputs: StepInputs,
        max_batch: int,
        max_model_len: int,
        *,
        num_kv_heads: int,
        device: torch.device,
        capturing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        collectives: bool = False,
    ) -> None:
        """``capturing``: a context the warm-up and the captures run in (the generic path's capturable experts).
        ``collectives``: the forward meets other ranks (tensor parallelism): capture in ``thread_local`` mode, so
        that NCCL's watchdog thread may query its events meanwhile."""
        self._mode = "thread_local" if collectives else "global"
        from .kernels.fused import argmax_into  # Triton (the CUDA build's); graphs exist on CUDA only

        self._argmax_into = argmax_into
        self.model_forward = forward
        self.inputs = inputs
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.max_batch = max_batch
        self.buckets = graph_buckets(max_batch)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        with capturing():
            self._capture(max_model_len)

    def _forward(self, b: int, splits: int, advance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if advance:
            self.inputs.advance(self.inputs.fixed_views, b)
        d = self.inputs.derive(self.inputs.fixed_views, b, b, b)
        logits = self.model_forward(d, splits)
        # logits.argmax(-1), as sampling.sample's greedy rows (bf16 -> fp32 keeps the order), written to the token
        # buffer and flagged -1 where the logits are not finite (sampling.flag_non_finite), in two small kernels
        return logits, self._argmax_into(logits, self.inputs.token_buf, d.sample_slots)

    def _capture(self, max_model_len: int) -> None:
        kv_heads = self.num_kv_heads
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.splits = {b: decode_splits(b, kv_heads, max_model_len, sms) for b in self.buckets}
        for b in sorted(set(self.splits.values())):  # compile each kernel variant before capture
            size = max(x for x in self.buckets if self.splits[x] == b)
            self._forward(size, b)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            for advance in (False, True):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode=self._mode):
                    logits, tokens = self._forward(b, self.splits[b], advance)
                self.graphs[(b, advance)] = (graph, logits, tokens)
        torch.cuda.synchronize()

    def release(self) -> None:
        """Free every captured graph now (the runner and its forward hold each other: garbage collection would
        free them only later)."""
        self.graphs.clear()

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} larger than the largest graph ({self.max_batch})")

    def replay(self, bucket: int, n: int, advance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph of ``bucket`` rows over the staged step of ``n`` rows (``advance``: the next sub-step of
        its round); returns ``(logits [n, vocab], greedy tokens [n])`` (views, valid until the next replay of that
        graph; a token is -1 where its row's logits are not finite)."""
        graph, logits, tokens = self.graphs[(bucket, advance)]
        graph.replay()
        return logits[:n], tokens[:n]
