"""acb: asyncio-native LLM inference with continuous batching.

Quick start::

    from acb import Engine, SamplingParams

    async with Engine(model, tokenizer) as engine:
        async for tok in engine.stream("Hello", SamplingParams(max_new_tokens=32)):
            print(tok.text, end="", flush=True)
"""

from __future__ import annotations

from .config import EngineConfig, SamplingParams
from .engine import Engine
from .errors import (
    AcbError,
    DuplicateRequestIdError,
    EngineClosedError,
    InvalidConfigError,
    InvalidPromptError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    ModelInUseError,
    ModelLoadError,
    PromptTooLongError,
    RequestFailedError,
    StreamInUseError,
    WrongEventLoopError,
)
from .loop import loop_factory, run
from .outputs import Completion, EngineStats, Token
from .stream import RequestStream

__all__ = [
    "Engine",
    "EngineConfig",
    "SamplingParams",
    "RequestStream",
    "Token",
    "Completion",
    "EngineStats",
    "AcbError",
    "InvalidConfigError",
    "InvalidRequestError",
    "InvalidSamplingParamsError",
    "InvalidPromptError",
    "PromptTooLongError",
    "DuplicateRequestIdError",
    "EngineClosedError",
    "RequestFailedError",
    "ModelInUseError",
    "ModelLoadError",
    "StreamInUseError",
    "WrongEventLoopError",
    "run",
    "loop_factory",
]

__version__ = "0.1.0"
