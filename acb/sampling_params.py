"""One request's decoding parameters: :class:`SamplingParams`, validated on construction (a bad value fails where it
is written, with :class:`~acb.errors.InvalidSamplingParamsError` naming the field), and the limits on what one request
may ask for (``MAX_*``, docs/api.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidSamplingParamsError

__all__ = [
    "SamplingParams",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "MAX_TOP_K",
    "MAX_TOP_LOGPROBS",
    "MAX_LOGIT_BIAS",
    "MAX_N",
    "MAX_GRAMMAR_CHARS",
    "MIN_REPETITION_PENALTY",
    "MAX_NEW_TOKENS",
]


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
MAX_NEW_TOKENS = 2**31 - 1
"""Largest ``max_new_tokens`` (and so ``min_tokens``): a request ends at the model's length limit long before; the
bound keeps both within the 64-bit integers the batch builder stores them in."""
MIN_REPETITION_PENALTY = 1e-6
"""Smallest ``repetition_penalty``: a seen token's positive logit is divided by it, which must stay finite in float32
(below about 1e-37 it overflowed, and the request failed on non-finite logits)."""
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
        _int_in("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
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
            _float_in("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, 10.0),
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
        if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 18:  # JSON object keys (OpenAI sends
            # them as strings); not "²" or "٣", which str.isdigit() also takes, nor more digits than int() parses
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


def _bounded_list(value: object, name: str, expected: str, most: int, items: str) -> None:
    """``value`` is a list or tuple of at most ``most`` entries, else a typed error naming ``name``."""
    if not isinstance(value, (list, tuple)):
        raise InvalidSamplingParamsError(f"{name} must be {expected}, got {type(value).__name__}", param=name)
    if len(value) > most:
        raise InvalidSamplingParamsError(f"{name} has {len(value)} {items}; at most {most} are allowed", param=name)


def _stop_strings(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    _bounded_list(stop, "stop", "a string or a list of strings", MAX_STOP_STRINGS, "strings")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidSamplingParamsError("stop must be a list of non-empty strings", param="stop")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidSamplingParamsError(
                f"a stop string has {len(s)} characters; at most {MAX_STOP_STRING_CHARS} are allowed", param="stop"
            )
    return tuple(stop)


def _stop_token_ids(ids: object) -> tuple[int, ...]:
    _bounded_list(ids, "stop_token_ids", "a list of token ids", MAX_STOP_TOKEN_IDS, "ids")
    if any(not _is_int(t) or t < 0 for t in ids):
        raise InvalidSamplingParamsError("stop_token_ids must be non-negative integers", param="stop_token_ids")
    return tuple(ids)
