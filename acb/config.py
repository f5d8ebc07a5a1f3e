"""User-facing configuration: :class:`EngineConfig` (the engine) and :class:`SamplingParams` (one request).

Both are validated on construction, so a bad value fails where it is written, with a typed error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidConfigError, InvalidSamplingParamsError

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
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
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


# Limits on what one request may ask for: each bounds host work per step or per request (docs/api.md).
MAX_STOP_STRINGS = 64
"""Most stop strings one request may give."""
MAX_STOP_STRING_CHARS = 256
"""Longest stop string, in characters."""
MAX_STOP_TOKEN_IDS = 1024
"""Most stop token ids one request may give."""
MAX_TOP_K = 2**31 - 1
"""Largest ``top_k`` (any value at least the vocabulary size means no top-k filtering)."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per position ``top_logprobs`` may ask for (OpenAI's limit)."""
MAX_LOGIT_BIAS = 1024
"""Most entries in one request's ``logit_bias``."""
MAX_N = 64
"""Largest ``n`` and ``best_of``."""
MAX_GRAMMAR_CHARS = 65536
"""Longest JSON schema (as JSON), regex or grammar, in characters."""
_FLOAT32_MAX = 3.4028234663852886e38


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How one request is decoded. The defaults are greedy decoding of up to 256 tokens (acb's defaults: where a
    request gives no parameters at all, the model's generation config comes first, see ``Engine.default_params``).

    Immutable and validated on construction: a request's parameters cannot change after the engine checked them
    (``dataclasses.replace`` makes a modified, re-validated copy). Stop lists are stored as tuples.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy (argmax). At most float32's largest value."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1 disables."""
    seed: int | None = None
    """Makes sampling reproducible for this request, whatever else shares its batches."""
    stop: tuple[str, ...] = ()
    """Strings that end the stream; the stop string itself is not emitted. A single string is accepted.
    At most ``MAX_STOP_STRINGS`` strings of at most ``MAX_STOP_STRING_CHARS`` characters."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the stream (besides EOS); their text is not emitted. At most ``MAX_STOP_TOKEN_IDS``."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token (benchmarks)."""
    logprobs: bool = False
    """Report each token's log-probability under the model (``Token.logprob``): the model's own distribution,
    before penalties, biases, grammar masks and temperature."""
    top_logprobs: int = 0
    """Also report the ``top_logprobs`` most likely tokens at each position with their log-probabilities
    (``Token.top_logprobs``; same distribution as ``logprob``). At most ``MAX_TOP_LOGPROBS``; > 0 implies
    ``logprobs``."""
    presence_penalty: float = 0.0
    """OpenAI's: subtract this from the logit of every token the output already contains. In [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtract this times the token's count in the output so far. In [-2, 2]."""
    repetition_penalty: float = 1.0
    """transformers' (CTRL): the logits of tokens in the prompt or the output so far are divided by this where
    positive, multiplied where negative. 1 disables; in (0, 10]."""
    min_tokens: int = 0
    """EOS and ``stop_token_ids`` cannot end the output before it has this many tokens (stop strings still can)."""
    logit_bias: Mapping[int, float] | None = None
    """Added to the logits of the given token ids before sampling, each in [-100, 100] (OpenAI's range; -100 in
    effect bans a token, 100 forces it). At most ``MAX_LOGIT_BIAS`` entries. Stored as a sorted tuple of pairs."""
    n: int = 1
    """Samples of the prompt (``Engine.generate_choices`` / ``submit_choices``); they share the prompt's KV
    blocks. At most ``MAX_N``."""
    best_of: int | None = None
    """Generate this many samples and keep the ``n`` with the highest cumulative log-probability
    (``Engine.generate_choices`` only). ``None`` = ``n``; at most ``MAX_N``."""
    json_schema: Mapping | str | None = None
    """Constrain the output to JSON that validates against this JSON Schema (a dict or its JSON text; stored as
    canonical JSON text). Output is compact JSON (no free whitespace between tokens)."""
    json_object: bool = False
    """Constrain the output to a JSON object (OpenAI's ``response_format={"type": "json_object"}``)."""
    regex: str | None = None
    """Constrain the output to match this regular expression."""
    grammar: str | None = None
    """Constrain the output to this EBNF grammar (GBNF dialect, root rule ``root``). At most one of
    ``json_schema``, ``json_object``, ``regex``, ``grammar``; each at most ``MAX_GRAMMAR_CHARS`` characters."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize in place once, here
        set_(self, "stop", _stop_strings(self.stop))
        set_(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidSamplingParamsError(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}", param="max_new_tokens"
            )
        set_(self, "temperature", _float_in("temperature", self.temperature, 0.0, _FLOAT32_MAX))
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidSamplingParamsError(
                f"top_k must be an integer in [0, {MAX_TOP_K}], got {self.top_k!r}", param="top_k"
            )
        set_(self, "top_p", _float_in("top_p", self.top_p, 0.0, 1.0, low_open=True))
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidSamplingParamsError(f"seed must be an integer or None, got {self.seed!r}", param="seed")
        for name in ("ignore_eos", "logprobs", "json_object"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSamplingParamsError(
                    f"{name} must be True or False, got {getattr(self, name)!r}", param=name
                )
        _int_in("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs:
            set_(self, "logprobs", True)
        set_(self, "presence_penalty", _float_in("presence_penalty", self.presence_penalty, -2.0, 2.0))
        set_(self, "frequency_penalty", _float_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        set_(
            self,
            "repetition_penalty",
            _float_in("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True),
        )
        _int_in("min_tokens", self.min_tokens, 0, self.max_new_tokens)
        set_(self, "logit_bias", _logit_bias(self.logit_bias))
        _int_in("n", self.n, 1, MAX_N)
        if self.best_of is not None:
            _int_in("best_of", self.best_of, self.n, MAX_N)
        set_(self, "json_schema", _json_schema(self.json_schema))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_GRAMMAR_CHARS):
                raise InvalidSamplingParamsError(
                    f"{name} must be a non-empty string of at most {MAX_GRAMMAR_CHARS} characters", param=name
                )
        given = [k for k in ("json_schema", "json_object", "regex", "grammar") if getattr(self, k)]
        if len(given) > 1:
            raise InvalidSamplingParamsError(f"give at most one output constraint, not {' and '.join(given)}",
                                             param=given[1])  # fmt: skip
        if given and (self.ignore_eos or self.min_tokens):
            name = "ignore_eos" if self.ignore_eos else "min_tokens"
            raise InvalidSamplingParamsError(
                f"{name} cannot be combined with {given[0]}: a constrained output ends where its grammar ends",
                param=name,
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``(kind, text)`` of the output constraint, if any: kind is json_schema, json_object, regex or grammar."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.grammar is not None:
            return "grammar", self.grammar
        return None

    @property
    def penalized(self) -> bool:
        """Whether anything changes this request's logits before sampling besides temperature and top-k/top-p
        (penalties, biases, ``min_tokens``): its rows then take the logits-processing pass."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.min_tokens
            or self.logit_bias
        )  # fmt: skip


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_in(name: str, value: object, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise InvalidSamplingParamsError(f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)


def _logit_bias(bias: object) -> tuple[tuple[int, float], ...] | None:
    if bias is None or (isinstance(bias, (Mapping, tuple, list)) and not bias):
        return None
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise InvalidSamplingParamsError(
            "logit_bias must map token ids to numbers ({id: bias})", param="logit_bias"
        ) from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidSamplingParamsError(
            f"logit_bias has {len(pairs)} entries; at most {MAX_LOGIT_BIAS} are allowed", param="logit_bias"
        )
    out = {}
    for k, v in pairs:
        if isinstance(k, str) and k.isdigit():  # JSON object keys (OpenAI sends them as strings)
            k = int(k)
        if not _is_int(k) or k < 0:
            raise InvalidSamplingParamsError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias")
        out[k] = _float_in("logit_bias", v, -100.0, 100.0)
    return tuple(sorted(out.items()))


def _json_schema(schema: object) -> str | None:
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidSamplingParamsError(f"json_schema is not valid JSON: {exc}", param="json_schema") from None
    if not isinstance(schema, (Mapping, bool)):
        raise InvalidSamplingParamsError("json_schema must be a JSON Schema object", param="json_schema")
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)  # key order kept: it orders the output
    except (TypeError, ValueError) as exc:
        raise InvalidSamplingParamsError(f"json_schema cannot be written as JSON: {exc}", param="json_schema") from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidSamplingParamsError(
            f"json_schema has {len(text)} characters as JSON; at most {MAX_GRAMMAR_CHARS} are allowed",
            param="json_schema",
        )
    return text


def _float_in(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``), or a typed error. Integers of
    any size are accepted if they fit; NaN, infinities and non-numbers are refused."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidSamplingParamsError(f"{name} must be a number, got {value!r}", param=name)
    try:
        f = float(value)
    except OverflowError:
        f = float("inf")
    ok = (low < f if low_open else low <= f) and f <= high  # False for NaN
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidSamplingParamsError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}", param=name)
    return f


def _stop_strings(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise InvalidSamplingParamsError(
            f"stop must be a string or a list of strings, got {type(stop).__name__}", param="stop"
        )
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidSamplingParamsError(
            f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop"
        )
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidSamplingParamsError("stop must be a list of non-empty strings", param="stop")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidSamplingParamsError(
                f"a stop string has {len(s)} characters; at most {MAX_STOP_STRING_CHARS} are allowed", param="stop"
            )
    return tuple(stop)


def _stop_token_ids(ids: object) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple)):
        raise InvalidSamplingParamsError(
            f"stop_token_ids must be a list of token ids, got {type(ids).__name__}", param="stop_token_ids"
        )
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidSamplingParamsError(
            f"stop_token_ids has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed", param="stop_token_ids"
        )
    if any(not _is_int(t) or t < 0 for t in ids):
        raise InvalidSamplingParamsError("stop_token_ids must be non-negative integers", param="stop_token_ids")
    return tuple(ids)
