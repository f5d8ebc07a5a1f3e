"""User-facing configuration: :class:`EngineConfig` (the engine), validated on construction, so a bad value fails where
it is written, with :class:`~acb.errors.InvalidConfigError`. One request's :class:`SamplingParams` and its limits live
in :mod:`acb.sampling_params` and are importable from here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidConfigError
from .sampling_params import (
    MAX_GRAMMAR_CHARS,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    SamplingParams,
    _is_int,
    _is_number,
)

__all__ = [
    "EngineConfig",
    "SamplingParams",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "MAX_TOP_K",
    "MAX_TOP_LOGPROBS",
    "MAX_LOGIT_BIAS",
    "MAX_N",
    "MAX_GRAMMAR_CHARS",
]


ADMISSION_ORDERS = ("arrival", "longest_first")


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
    """Token budget of one step: decode tokens plus prefill chunk tokens. One token of it is always kept for every
    running sequence that decodes: a prompt never takes a decode's place."""
    prefill_chunk_tokens: int | None = None
    """While running sequences decode, a step carries at most this many prompt tokens (chunks of running prompts and new
    prompts together; the rest continues in later steps). It bounds what starting prompts adds to the inter-token
    latency of the running streams, at some cost in time to first token under load (docs/tuning.md). ``None``: up
    to ``max_num_batched_tokens``."""
    max_model_len: int | None = None
    """Longest prompt + output; ``None`` takes the model's ``max_position_embeddings`` (4096 if its config has none).
    A larger value is refused by ``Engine(...)`` (``InvalidConfigError``): past them, learned position embeddings
    (GPT-2) have no row and rotary ones were never trained; only rotary scaling in the model's config (``linear``,
    ``dynamic``, ``yarn``) raises the limit, by its factor as vLLM does (``acb.model_setup.resolve_max_model_len``)."""
    admission_group: int | None = None
    """While a batch decodes and more requests queue than can start, new requests start in groups of at least this
    many (``None``: ``max_num_seqs // 8``), so that the eager step that starts their prompts runs once per group
    rather than once per freed slot; decode-only steps in between replay a CUDA graph. 1 starts each at once."""
    admission_max_delay: int = 16
    """Most steps a group may be held back waiting to fill up."""
    admission_order: str = "arrival"
    """Which queued request takes a free batch slot first: ``"arrival"`` (first come, first served) or
    ``"longest_first"``: the one allowed the most output tokens (``SamplingParams.max_new_tokens``, capped by
    ``max_model_len``), ties in arrival order, as SGLang's ``lof`` policy. For offline batches whose requests say how
    long they run (a benchmark, a dataset job): the longest ones start at once instead of last, so the run does not
    end with a few long requests decoding alone (W-share's 2,048-token request arrives 976th of 1,000). Under a steady
    stream of long requests a short one may wait a long time: not for interactive serving (docs/tuning.md)."""
    max_pending: int = 4096
    """Admitted requests that may wait for a batch slot; further ``stream()`` calls wait (backpressure)."""
    overlap: bool = True
    """Prepare and launch step N+1 before step N's tokens reach the host (async mode); ``False`` steps
    synchronously (sync mode, the baseline)."""
    overlap_depth: int = 2
    """With ``overlap``: most steps launched but not yet processed. 2 runs the host one step ahead; 3 also absorbs
    a late wake-up of the loop, at the cost of one more computed (never emitted) token when a request ends by EOS
    or a stop condition."""
    prefix_caching: bool = True
    """Share the KV blocks of prompt prefixes between requests (system prompts, few-shot examples, multi-turn
    history, repeats): a request computes only what the cache does not hold. Full blocks are cached by content;
    unused cached blocks are reused for new content least recently used first, only when no empty block is left."""
    decode_steps: int = 1
    """Multi-step decode: a step that only decodes (it starts no prompt) runs this many positions per sequence back
    to back on the device, each fed with the previous sample, and the host schedules, prepares and delivers once per
    round. Cuts host work per token by about this factor (for batches the host cannot keep up with otherwise);
    costs: tokens arrive in bursts of this many, a request that ends by EOS or a stop condition computes up to this
    many tokens it never emits, and a request that arrives mid-round waits for the rounds in flight. 1 = off."""
    device: str | None = None
    """Device to run on: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (or the ``torch.device``; stored as its name);
    ``None`` keeps the model's device. Anything else (``"meta"``, ``"mps"``), or a GPU the machine lacks, is refused
    with ``InvalidConfigError`` before the model is moved."""
    dtype: str | None = None
    """Compute dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or ``"fp32"``, ``"bf16"``, ``"fp16"``, or the
    ``torch.dtype``; stored as its name); ``None`` keeps the model's dtype."""
    fast_path: bool | None = None
    """Run models whose family has a lean adapter (:mod:`acb.families`) through acb's lean model (fused kernels);
    ``None`` = on CUDA when supported.
    ``True`` on the CPU runs the same model logic on plain torch ops (tests)."""
    cuda_graphs: bool = True
    """Replay decode steps as CUDA graphs (on CUDA; both paths, see ``engine.path_reason`` for a model that cannot)."""
    mixed_graphs: bool = False
    """Piecewise CUDA graphs for the steps that start prompts (lean path, one GPU; :mod:`acb.mixed_graphs`): each
    layer's work between two attentions is one replay per token bucket, attention runs eagerly between. Off by
    default: on an H200, W-share ran 5 % slower with them (its prompt steps are large and compute-bound, docs/
    benchmarks.md); the graphs take GPU memory of their own (static buffers per bucket and the largest bucket's
    activations)."""
    tensor_parallel_size: int = 1
    """Split the model over this many processes (one GPU each on CUDA; gloo on the CPU): the engine's process runs
    rank 0, acb starts the others (``spawn``: build the engine under ``if __name__ == "__main__":``). Needs the lean
    path (a model family with an adapter); heads, KV heads and the MLP width must divide by it. See docs/parallel.md."""
    warmup: bool | None = None
    """Before ``start()`` returns, run a few internal requests that meet what the first real steps would otherwise
    meet for the first time: Triton's kernel variants (prefill tiles for short and long prompts, the penalty kernel),
    the allocator's largest step. ``None``: on CUDA only. Its duration is in ``engine.startup`` and the log."""
    record_step_timing: bool = False
    """Record CUDA events around every step's GPU work (``engine.step_intervals()``; benchmarks)."""
    long_prompt_chars: int = 2048
    """Prompts longer than this are tokenized in the engine's tokenizer thread, not on the event loop."""
    max_prompt_chars: int | None = None
    """Longest text prompt, in characters, that admission will tokenize (a chat: the prompt rendered with its chat
    template, template text included); a longer one is refused with ``PromptTooLongError`` before any tokenizer
    work. ``None``: 16 × ``max_model_len`` (real text averages 3-5 characters per token, so this refuses only
    prompts that could not fit anyway)."""
    drain_timeout: float = 30.0
    """Seconds ``close()`` lets running requests finish before it fails the rest with ``EngineClosedError``
    (``float("inf")``: as long as they take)."""

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if not _is_number(self.kv_memory_fraction) or not 0.0 < self.kv_memory_fraction <= 1.0:  # NaN fails too
            raise InvalidConfigError(f"kv_memory_fraction must be a number in (0, 1], got {self.kv_memory_fraction!r}")
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.prefill_chunk_tokens is not None:
            _positive("prefill_chunk_tokens", self.prefill_chunk_tokens)
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 2):
            raise InvalidConfigError(  # a prompt of one token and one generated need two positions
                f"max_model_len must be an integer >= 2, got {self.max_model_len!r}"
            )
        _positive("max_pending", self.max_pending)
        if self.admission_order not in ADMISSION_ORDERS:
            raise InvalidConfigError(f"admission_order must be one of {ADMISSION_ORDERS}, got {self.admission_order!r}")
        if self.admission_group is not None:
            _positive("admission_group", self.admission_group)
        if not _is_int(self.admission_max_delay) or self.admission_max_delay < 0:
            raise InvalidConfigError(f"admission_max_delay must be an integer >= 0, got {self.admission_max_delay!r}")
        for name in ("prefix_caching", "mixed_graphs", "overlap", "cuda_graphs", "record_step_timing"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not _is_int(self.decode_steps) or not 1 <= self.decode_steps <= 64:
            raise InvalidConfigError(f"decode_steps must be an integer in [1, 64], got {self.decode_steps!r}")
        if not _is_int(self.overlap_depth) or not 2 <= self.overlap_depth <= 8:
            raise InvalidConfigError(f"overlap_depth must be an integer in [2, 8], got {self.overlap_depth!r}")
        if self.max_num_batched_tokens < self.max_num_seqs and self.max_num_batched_tokens < 1:
            raise InvalidConfigError("max_num_batched_tokens must allow at least one token per step")
        if self.dtype is not None:
            self.dtype = _dtype_name(self.dtype)
        if self.device is not None:
            self.device = _device_name(self.device)
        if self.max_prompt_chars is not None:
            _positive("max_prompt_chars", self.max_prompt_chars)
        _positive("long_prompt_chars", self.long_prompt_chars)
        if not _is_number(self.drain_timeout) or not self.drain_timeout >= 0:  # NaN fails too
            raise InvalidConfigError(
                f"drain_timeout must be a number of seconds >= 0 (inf: wait), got {self.drain_timeout!r}"
            )
        if not _is_int(self.tensor_parallel_size) or not 1 <= self.tensor_parallel_size <= 64:
            raise InvalidConfigError(
                f"tensor_parallel_size must be an integer in [1, 64], got {self.tensor_parallel_size!r}"
            )
        for name in ("warmup", "fast_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise InvalidConfigError(f"{name} must be True, False or None, got {getattr(self, name)!r}")


_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip


def _dtype_name(dtype) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` from a name, an alias or a ``torch.dtype`` (no torch import)."""
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPE_NAMES:
        raise InvalidConfigError(
            f"dtype must be float32, bfloat16 or float16 (or bf16, fp16, fp32, a torch dtype): {dtype!r}"
        )
    return _DTYPE_NAMES[key]


def _device_name(device) -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` from that name or a ``torch.device`` (no torch import); whether that GPU
    exists is checked when the engine is built (:func:`acb.model_setup.check_device`)."""
    name = str(device) if type(device).__name__ == "device" else device  # a torch.device
    if not isinstance(name, str) or not re.fullmatch(r"cpu(:0)?|cuda(:\d+)?", name):
        raise InvalidConfigError(f"device must be 'cpu', 'cuda' or 'cuda:<index>' (acb runs on these), got {device!r}")
    return name


def _positive(name: str, value: int) -> None:
    if not _is_int(value) or value < 1:
        raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}")
