"""GPU launch: run one prepared step through the model and sample, without blocking the event loop.

Steps execute in launch order on one worker thread (the CPU's equivalent of a CUDA stream): while step N computes
there, the event loop schedules and prepares step N+1. On CUDA the worker only enqueues kernels and a completion
event; :mod:`acb.bridge` awaits that event from the loop.

Overlap hinges on the device-side token buffer: each step writes every sampled token to ``token_buf[slot]``, and
the next step gathers its decode inputs from there, so step N+1 can be launched before step N's tokens reach the
host.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionMetadata
from .batch import StepBatch
from .kv_cache import KVCache
from .sampling import SamplingTensors, sample

__all__ = ["StepResult", "StepHandle", "ModelRunner"]


@dataclass(slots=True)
class StepResult:
    """What a step leaves for the host: sampled tokens (valid once ``event`` completed, if any)."""

    tokens: torch.Tensor  # [S] int64 on the host
    logprobs: torch.Tensor | None  # [S] float32 on the host
    event: torch.cuda.Event | None


@dataclass(slots=True)
class StepHandle:
    batch: StepBatch
    future: concurrent.futures.Future[StepResult]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, max_num_seqs: int, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.token_buf = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self._pin = device.type == "cuda"
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="acb-step")

    def launch(self, batch: StepBatch) -> StepHandle:
        """Queue ``batch`` for execution after every step launched before it; returns at once."""
        return StepHandle(batch, self._worker.submit(self._execute, batch))

    def close(self) -> None:
        """Wait for queued steps, then stop the worker (blocking: call it from a thread)."""
        self._worker.shutdown(wait=True)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def _execute(self, b: StepBatch) -> StepResult:
        dev = self._to_device
        input_ids = dev(b.input_ids)
        if len(b.device_idx):
            input_ids[dev(b.device_idx)] = self.token_buf[dev(b.device_slots)]
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=dev(b.slot_mapping),
            query_start_loc=b.query_start_loc.tolist(),
            seq_lens=b.seq_lens.tolist(),
            block_tables=dev(b.block_tables),
            decode_only=b.decode_only,
        )
        sample_idx = dev(b.sample_idx)
        out = self.model(
            input_ids=input_ids[None],
            position_ids=dev(b.positions)[None],
            use_cache=False,
            logits_to_keep=sample_idx,
            acb_meta=meta,
        )
        logits = out.logits[0]
        params = SamplingTensors(
            temperature=dev(b.temperature),
            top_k=dev(b.top_k),
            top_p=dev(b.top_p),
            seeds=dev(b.seeds),
            positions=dev(b.sample_positions),
            all_greedy=b.all_greedy,
            needs_filter=b.needs_filter,
            needs_logprobs=b.needs_logprobs,
        )
        tokens, logprobs = sample(logits, params)
        self.token_buf[dev(b.sample_slots)] = tokens
        event = None
        if self.device.type == "cuda":
            tokens = tokens.to("cpu", non_blocking=True)
            logprobs = None if logprobs is None else logprobs.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return StepResult(tokens, logprobs, event)
