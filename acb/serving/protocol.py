"""The OpenAI request and response bodies acb speaks, as pydantic models, and the mapping of a request onto
:class:`acb.SamplingParams`.

Every request field is either honoured or refused with an OpenAI-shaped 400 naming it: nothing a client sends is
silently ignored, except the informational ``user`` and ``metadata``, and no value is coerced (``true`` is not 1).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import SamplingParams
from ..errors import InvalidSamplingParamsError

__all__ = [
    "CompletionRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "to_sampling_params",
    "openai_param",
    "ErrorBody",
    "ErrorResponse",
    "Usage",
    "CompletionChoice",
    "CompletionResponse",
    "ChatChoice",
    "ChatCompletionResponse",
    "ModelCard",
    "ModelList",
    "CompletionLogprobs",
    "ChatLogprobs",
]

_INFORMATIONAL = {"user", "metadata"}  # accepted and not used, as OpenAI documents them


# -- requests -----------------------------------------------------------------------------------------------------


class _Base(BaseModel):
    # unknown fields are collected and refused (to_sampling_params); strict: no coercion, so `true` or "3" is not
    # taken for an integer (an int is still taken for a float)
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (as in vLLM)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    ignore_eos: bool = False  # extension, for benchmarks
    # extensions (as in vLLM / SGLang)
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    regex: str | None = None
    grammar: str | None = None


class CompletionRequest(_Base):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        """Content parts are text: an image (or any other kind) would be dropped by the chat template unseen. The
        template gets their texts joined by newlines, as a plain string (as vLLM joins them): a template prints a
        message's content as a string, and a list would reach the prompt as its Python repr."""
        if not isinstance(content, list):
            return content
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content parts must be {{'type': 'text', 'text': ...}}; {part.get('type')!r} "
                                 "parts are not supported")  # fmt: skip
        return "\n".join(part["text"] for part in content)


class ChatCompletionRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class UnsupportedFieldError(InvalidSamplingParamsError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"'{field}' {why}", param=field)


def _response_format(fmt: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's ``response_format`` as SamplingParams fields. ``json_schema`` is enforced whether or not ``strict``
    is set (a constrained output always conforms)."""
    if fmt is None:
        return {}
    kind = fmt.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise UnsupportedFieldError("response_format", "of type json_schema needs json_schema.schema")
        return {"json_schema": spec["schema"]}
    raise UnsupportedFieldError("response_format", "type must be text, json_object or json_schema")


def to_sampling_params(req: _Base, defaults: SamplingParams) -> SamplingParams:
    """Map an OpenAI request onto SamplingParams; what it omits comes from ``defaults`` (the engine's
    ``default_params``: the model's generation config, then acb's defaults, as everywhere in acb)."""
    for name in req.model_extra or {}:
        if name not in _INFORMATIONAL:
            raise UnsupportedFieldError(name, "is not supported by this server; leave it out")
    if req.stream_options is not None:
        if not req.stream:
            raise UnsupportedFieldError("stream_options", "is only allowed with stream: true")
        unknown_options = set(req.stream_options) - {"include_usage"}
        if unknown_options:
            raise UnsupportedFieldError("stream_options", f"supports only include_usage, not {sorted(unknown_options)}")
        if not isinstance(req.stream_options.get("include_usage", False), bool):
            raise UnsupportedFieldError("stream_options", "include_usage must be true or false")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise UnsupportedFieldError("echo", "is not supported")
        if req.suffix:
            raise UnsupportedFieldError("suffix", "is not supported")
        if req.best_of is not None and req.stream and req.best_of > req.n:
            raise UnsupportedFieldError("best_of", "cannot be combined with stream (it ranks whole outputs)")
        logprobs = req.logprobs is not None
        top = req.logprobs or 0
    else:
        if req.top_logprobs and not req.logprobs:
            raise UnsupportedFieldError("top_logprobs", "needs logprobs: true")
        logprobs = req.logprobs
        top = req.top_logprobs or 0
    max_tokens = next(
        (v for v in (getattr(req, "max_completion_tokens", None), req.max_tokens) if v is not None),
        defaults.max_new_tokens,
    )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    fields = dict(
        max_new_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else defaults.temperature,
        top_p=req.top_p if req.top_p is not None else defaults.top_p,
        top_k=req.top_k if req.top_k is not None else defaults.top_k,
        seed=req.seed,
        stop=stop,
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top,
        n=req.n,
        best_of=getattr(req, "best_of", None),
        logit_bias=req.logit_bias,
        regex=req.regex,
        grammar=req.grammar,
        **_response_format(req.response_format),
    )
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        return SamplingParams(**fields)
    except InvalidSamplingParamsError as exc:
        exc.param = openai_param(exc.param, req)
        raise


def openai_param(param: str | None, req: _Base | None = None) -> str | None:
    """The request field an acb parameter came from (``max_new_tokens`` is ``max_tokens``, or
    ``max_completion_tokens`` where the chat request used that)."""
    if param == "max_new_tokens":
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens"
    if param == "prompt" and isinstance(req, ChatCompletionRequest):
        return "messages"
    if param in ("json_schema", "json_object") and req is not None and req.response_format is not None:
        return "response_format"
    if param == "top_logprobs" and isinstance(req, CompletionRequest):
        return "logprobs"
    return param


# -- responses ----------------------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "acb"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
