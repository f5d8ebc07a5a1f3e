"""Every error acb raises at its API boundary, in one place.

The hierarchy lets callers catch broadly (``AcbError``) or precisely. Request validation errors also derive from
``ValueError`` so code written against plain Python conventions keeps working.
"""

from __future__ import annotations

__all__ = [
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
    "StreamInUseError",
    "WrongEventLoopError",
    "WorkerFailedError",
    "ModelLoadError",
]


class AcbError(Exception):
    """Base class of every error raised by acb."""


class InvalidConfigError(AcbError, ValueError):
    """An :class:`~acb.EngineConfig` field has the wrong type or is out of range (raised where the config is built),
    or does not fit the model or the machine: a device that is not there, a ``max_model_len`` past the model's
    positions (raised by ``Engine(...)`` before it touches the model)."""


class InvalidRequestError(AcbError, ValueError):
    """The request was rejected at admission; nothing was scheduled for it.

    ``param`` names the offending field where there is one (as OpenAI-style error bodies do).
    """

    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class InvalidSamplingParamsError(InvalidRequestError):
    """A :class:`~acb.SamplingParams` field is out of range."""


class InvalidPromptError(InvalidRequestError):
    """The prompt is empty, of the wrong type, or holds token ids outside the vocabulary."""

    param = "prompt"


class PromptTooLongError(InvalidRequestError):
    """The request cannot fit: longer than ``max_model_len`` or than the whole KV cache."""

    param = "prompt"


class DuplicateRequestIdError(InvalidRequestError):
    """A live request already uses this ``request_id``."""


class EngineClosedError(AcbError):
    """The engine is not running (never started, closing, or closed)."""


class RequestFailedError(AcbError):
    """The request failed inside the engine (a failing step, a tokenizer error). Other requests keep running.

    The original exception is chained as ``__cause__``.
    """


class ModelInUseError(AcbError, RuntimeError):
    """An open engine already serves this model through acb's lean path (fused weights, its KV cache): a second
    engine on the same model object would share them. Close the first engine, or give the second its own model."""


class StreamInUseError(AcbError, RuntimeError):
    """A second consumer tried to read a stream that another ``async for`` (or task) is reading: a stream has one
    consumer. The first consumer is unaffected."""


class WrongEventLoopError(AcbError, RuntimeError):
    """The engine was used from an event loop other than the one it was started on (another thread's
    ``asyncio.run``, say). The engine keeps serving its own loop; submit from that loop (from another thread, with
    ``asyncio.run_coroutine_threadsafe``, or ``trio.from_thread.run`` when the engine runs on trio)."""


class WorkerFailedError(AcbError, RuntimeError):
    """A tensor-parallel worker process died or its connection broke: the engine stops serving (every live request
    ends with :class:`RequestFailedError` naming this), and its other workers are shut down."""


class ModelLoadError(AcbError, OSError):
    """``Engine.from_pretrained`` could not load the model or its tokenizer: no such directory or hub id, a missing,
    truncated or corrupt file, weights that do not fit the config, a custom architecture without
    ``trust_remote_code=True``. The loader's own error is chained as the cause."""
