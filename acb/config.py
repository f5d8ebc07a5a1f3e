"""User-facing configuration: :class:`EngineConfig` (the engine) and :class:`SamplingParams` (one request).

Both are validated on construction, so a bad value fails where it is written, with a typed error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidSamplingParamsError

__all__ = ["EngineConfig", "SamplingParams"]


@dataclass(slots=True)
class EngineConfig:
    """How the engine batches, caches and runs.

    ``None`` fields are resolved from the model and the device when the engine is built.
    """

    block_size: int = 16
    """Tokens per KV-cache block (the paging granularity)."""
    num_kv_blocks: int | None = None
    """KV-cache blocks; ``None`` sizes the cache from free memory (``kv_memory_fraction`` of it)."""
    kv_memory_fraction: float = 0.85
    """Share of free device memory (CUDA) or available RAM (CPU, capped at 25 %) the KV cache may take when sized
    automatically."""
    max_num_seqs: int = 256
    """Most sequences in one step (the decode batch size)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: decode tokens plus prefill chunk tokens."""
    max_model_len: int | None = None
    """Longest prompt + output; ``None`` takes the model's ``max_position_embeddings``."""
    admission_group: int | None = None
    """While a batch decodes and more requests queue than can start, new requests start in groups of at least this
    many (``None``: ``max_num_seqs // 8``), so that the eager step that starts their prompts runs once per group
    rather than once per freed slot; decode-only steps in between replay a CUDA graph. 1 starts each at once."""
    admission_max_delay: int = 16
    """Most steps a group may be held back waiting to fill up."""
    max_pending: int = 4096
    """Admitted requests that may wait for a batch slot; further ``stream()`` calls wait (backpressure)."""
    overlap: bool = True
    """Prepare and launch step N+1 before step N's tokens reach the host (async mode); ``False`` steps
    synchronously (sync mode, the baseline)."""
    overlap_depth: int = 2
    """With ``overlap``: most steps launched but not yet processed. 2 runs the host one step ahead; 3 also absorbs
    a late wake-up of the loop, at the cost of one more computed (never emitted) token when a request ends by EOS
    or a stop condition."""
    device: str | None = None
    """Device to run on; ``None`` keeps the model's device."""
    dtype: str | None = None
    """Compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); ``None`` keeps the model's dtype."""
    fast_path: bool | None = None
    """Run Llama/Qwen-family models through acb's lean model (fused kernels); ``None`` = on CUDA when supported.
    ``True`` on the CPU runs the same model logic on plain torch ops (tests)."""
    cuda_graphs: bool = True
    """Replay decode steps as CUDA graphs (lean path on CUDA only)."""
    record_step_timing: bool = False
    """Record CUDA events around every step's GPU work (``engine.step_intervals()``; benchmarks)."""
    long_prompt_chars: int = 2048
    """Prompts longer than this are tokenized in a worker thread, not on the event loop."""
    drain_timeout: float = 30.0
    """Seconds ``close()`` lets running requests finish before it fails the rest with ``EngineClosedError``."""

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        _positive("max_pending", self.max_pending)
        if self.admission_group is not None:
            _positive("admission_group", self.admission_group)
        if not isinstance(self.admission_max_delay, int) or self.admission_max_delay < 0:
            raise ValueError(f"admission_max_delay must be an integer >= 0, got {self.admission_max_delay!r}")
        if not isinstance(self.overlap_depth, int) or not 2 <= self.overlap_depth <= 8:
            raise ValueError(f"overlap_depth must be an integer in [2, 8], got {self.overlap_depth!r}")
        if self.max_num_batched_tokens < self.max_num_seqs and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must allow at least one token per step")
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded. The defaults are greedy decoding of up to 64 tokens."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1 disables."""
    seed: int | None = None
    """Makes sampling reproducible for this request, whatever else shares its batches."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the stream; the stop string itself is not emitted."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the stream (besides EOS); their text is not emitted."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token (benchmarks)."""
    logprobs: bool = False
    """Report each token's log-probability under the model (``Token.logprob``)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidSamplingParamsError(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}", param="max_new_tokens"
            )
        if not _is_number(self.temperature) or not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise InvalidSamplingParamsError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}", param="temperature"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidSamplingParamsError(f"top_k must be an integer >= 0, got {self.top_k!r}", param="top_k")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParamsError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidSamplingParamsError(f"seed must be an integer or None, got {self.seed!r}", param="seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidSamplingParamsError("stop must be a list of non-empty strings", param="stop")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParamsError("stop_token_ids must be non-negative integers", param="stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
