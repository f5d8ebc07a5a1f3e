"""The OpenAI request bodies acb accepts, as pydantic models, and their mapping onto :class:`acb.SamplingParams`.

Fields acb does not implement are rejected with a clear 400 when set to a non-default value, never silently
ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import SamplingParams
from ..errors import InvalidSamplingParamsError

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "to_sampling_params"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields (e.g. "user", "metadata") are accepted and unused

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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # extension, for benchmarks


class CompletionRequest(_Base):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class UnsupportedFieldError(InvalidSamplingParamsError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"'{field}' {why}", param=field)


def to_sampling_params(req: _Base, defaults: dict[str, Any], max_tokens_default: int) -> SamplingParams:
    """Map an OpenAI request onto SamplingParams; the model's generation-config defaults fill omitted fields."""
    if req.n != 1:
        raise UnsupportedFieldError("n", "must be 1 (acb returns one choice per prompt)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise UnsupportedFieldError(name, "is not supported yet; omit it or send 0")
    if req.logit_bias:
        raise UnsupportedFieldError("logit_bias", "is not supported yet")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise UnsupportedFieldError("echo", "is not supported")
        if req.suffix:
            raise UnsupportedFieldError("suffix", "is not supported")
        if req.best_of not in (None, 1):
            raise UnsupportedFieldError("best_of", "must be 1")
    max_tokens = next(
        (v for v in (getattr(req, "max_completion_tokens", None), req.max_tokens) if v is not None), max_tokens_default
    )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    logprobs = bool(req.logprobs) if isinstance(req, ChatCompletionRequest) else req.logprobs is not None
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else defaults.get("temperature", 1.0),
        top_p=req.top_p if req.top_p is not None else defaults.get("top_p", 1.0),
        top_k=req.top_k if req.top_k is not None else defaults.get("top_k", 0),
        seed=req.seed,
        stop=stop,
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )
