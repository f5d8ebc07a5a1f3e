"""Delivery to one request: its output channel, detokenization state, and the user-facing async iterator.

Each request owns an unbounded channel, so a slow consumer only lets its own tokens pile up: it never stalls the
step loop or other requests.

A stream has one consumer. ``async for`` iterates through a fresh iterator object that only the loop holds, so
leaving the loop (``break``, an exception) drops it and ends the request at once, even while the stream object itself
is still referenced; a second concurrent consumer gets :class:`~acb.errors.StreamInUseError`.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from . import aio
from .errors import StreamInUseError
from .outputs import Completion, Token
from .sequence import Sequence
from .stops import StopStringMatcher, StopStrings

if TYPE_CHECKING:
    from .admission import Prompt
    from .config import SamplingParams

__all__ = ["EngineLink", "RequestState", "RequestStream"]


class Channel:
    """A one-consumer, unbounded channel: a deque plus one waiter (lighter than a queue class, which matters at one
    item per request per step). Loop thread only.

    ``wake_at`` lets a consumer take tokens in chunks: once it has read everything, it is woken again only when that
    many items wait (or the stream ended). The first item always wakes it at once."""

    __slots__ = ("_items", "_waiter", "wake_at", "_ended", "_started")

    def __init__(self, wake_at: int = 1) -> None:
        self._items: deque = deque()
        self._waiter = None  # a waiter of the engine's loop (aio.Loop.waiter)
        self.wake_at = wake_at
        self._ended = False
        self._started = False  # the first item was handed out

    def put_nowait(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None or not isinstance(item, Token) or item[3] is not None:
            self._wake(final=not isinstance(item, Token) or item[3] is not None)

    def put_many(self, items: list) -> None:
        """Several items at once: the consumer is woken at most once."""
        self._items.extend(items)
        self._wake(final=items[-1][3] is not None)

    def _wake(self, final: bool) -> None:
        if final:
            self._ended = True
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.done()
            and (self._ended or not self._started or len(self._items) >= self.wake_at)
        ):
            waiter.set_result(None)

    def take(self):
        """The next item if one is waiting, else ``None`` (no suspension: the hot path of a keeping-up consumer)."""
        if self._items:
            self._started = True
            return self._items.popleft()
        return None

    def arm(self, loop: aio.Loop):
        """A waiter that the next delivery worth waking for resolves (the consumer awaits it, then calls
        :meth:`take` again)."""
        self._waiter = waiter = loop.waiter()
        return waiter


class RequestState:
    """The engine's side of one request: sequence, text decoding state, stop strings and the output channel."""

    __slots__ = ("seq", "channel", "text", "stops", "closed", "queued")

    def __init__(self, seq: Sequence, text_state, stops: StopStrings | None = None, stream_interval: int = 1) -> None:
        self.seq = seq
        self.channel = Channel(stream_interval)
        self.text = text_state  # the request's state in the engine's TextDecoder
        self.stops = StopStringMatcher(stops) if stops is not None else None
        self.closed = False
        self.queued = False  # in the engine's admission queue (admitted, not yet handed to the scheduler)

    def end(self, item: Token | BaseException) -> None:
        """Close the channel with a final marker token or an error."""
        if not self.closed:
            self.closed = True
            self.channel.put_nowait(item)


class EngineLink(Protocol):
    """What a stream needs of its engine: the engine hands each stream one (``Engine._link``)."""

    loop: aio.Loop | None

    def check_loop(self) -> None:
        """Raise :class:`~acb.errors.WrongEventLoopError` off the engine's loop."""

    async def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None, attach, stream_interval: int
    ) -> RequestState:
        """Admit the request (typed errors); ``attach`` receives its state as soon as it exists."""

    def abort(self, state: RequestState) -> None:
        """End the request from any thread."""


class RequestStream(AsyncIterator[Token]):
    """``async for tok in engine.stream(prompt)``, or ``async with engine.stream(prompt) as s: async for tok in s``.

    Submission happens on the first iteration (or on entering ``async with``), so admission errors (typed, see
    :mod:`acb.errors`) surface there. Leaving the ``async for`` loop early, leaving the ``async with`` block,
    cancelling the consuming task, or :meth:`aclose` aborts the request and frees its KV blocks at once.
    """

    def __init__(
        self,
        engine: EngineLink,
        prompt: Prompt,
        params: SamplingParams | None,
        request_id: str,
        stream_interval: int = 1,
    ) -> None:
        self._engine = engine
        self._interval = stream_interval
        self._prompt = prompt
        self._params = params
        self._state: RequestState | None = None
        self._done = False
        self._reading = False  # a consumer is inside __anext__
        self._iteration: weakref.ref[_Iteration] | None = None
        self.request_id = request_id

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length in tokens (0 before the first iteration submitted the request)."""
        return self._state.seq.num_prompt if self._state is not None else 0

    @property
    def num_ready(self) -> int:
        """Items already delivered and not yet read (tokens, the final marker or an error): that many ``__anext__``
        calls return without suspending. Lets a consumer write what arrived together in one go."""
        return len(self._state.channel._items) if self._state is not None else 0

    def __aiter__(self) -> _Iteration:
        live = self._iteration() if self._iteration is not None else None
        if live is not None and not self._done:
            raise StreamInUseError(
                f"stream {self.request_id!r} is already being iterated by another `async for`; a stream has one "
                "consumer"
            )
        it = _Iteration(self)
        self._iteration = weakref.ref(it)
        return it

    async def __anext__(self) -> Token:
        if self._state is None or self._done or self._reading:
            await self._start()  # the first call submits; a finished or busy stream raises
        channel = self._state.channel
        item = channel.take()  # a token already waiting: no suspension, nothing loop-bound touched
        if item is None:
            item = await self._wait(channel)
        return self._checked(item)

    async def _start(self) -> None:
        if self._done:
            raise StopAsyncIteration
        if self._reading:
            raise StreamInUseError(f"stream {self.request_id!r} is already being read by another task")
        self._engine.check_loop()
        self._reading = True
        try:
            await self._engine.submit(self.request_id, self._prompt, self._params, self._attach, self._interval)
        except BaseException:
            self._done = True
            self._abort()
            raise
        finally:
            self._reading = False

    async def _wait(self, channel: Channel):
        loop = self._engine.loop
        if loop is None or not loop.is_current():
            self._engine.check_loop()
        self._reading = True
        try:
            item = None
            while item is None:
                await channel.arm(loop)
                item = channel.take()
            return item
        except BaseException:
            self._done = True
            self._abort()
            raise
        finally:
            self._reading = False
            channel._waiter = None

    def _checked(self, item) -> Token:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item[3] is not None:  # finish_reason: the stream's last item
            self._done = True
        return item

    async def collect(self) -> Completion:
        """Read the whole stream into a :class:`Completion` (what :meth:`acb.Engine.generate` returns)."""
        texts: list[str] = []
        ids: list[int] = []
        logprobs: list[float] = []
        tops: list = []
        reason = "abort"
        async for tok in self:
            texts.append(tok.text)
            if tok.id is not None:
                ids.append(tok.id)
                if tok.logprob is not None:
                    logprobs.append(tok.logprob)
                if tok.top_logprobs is not None:
                    tops.append(tok.top_logprobs)
            if tok.finish_reason is not None:
                reason = tok.finish_reason
        seq = self._state.seq if self._state is not None else None
        return Completion(
            request_id=self.request_id,
            text="".join(texts),
            token_ids=ids,
            finish_reason=reason,
            prompt_token_ids=seq.token_ids[: seq.num_prompt] if seq is not None else [],
            logprobs=logprobs if seq is not None and seq.params.logprobs else None,
            top_logprobs=tops if seq is not None and seq.params.top_logprobs else None,
        )

    async def start(self) -> RequestStream:
        """Submit the request now, if the first iteration has not: admission errors are raised here."""
        if self._state is None and not self._done:
            await self._start()
        return self

    async def __aenter__(self) -> RequestStream:
        """Submit the request now (admission errors are raised here); leaving the block ends it."""
        return await self.start()

    def _attach(self, state: RequestState) -> None:
        """Called by the engine once the request exists, before it may wait for room in the admission queue."""
        self._state = state
        if self._done:  # closed while it was being admitted
            self._abort()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the request (if it is still running) and free its KV blocks."""
        self._done = True
        self._abort()

    def _abort(self) -> None:
        if self._state is not None and not self._state.closed:
            self._engine.abort(self._state)

    def __del__(self) -> None:
        if not self._done:
            self._abort()


class _Iteration:
    """One ``async for`` over a :class:`RequestStream`. Only the loop holds it: when the loop is left early, CPython
    drops it at once, and the request ends without waiting for the stream object to be collected."""

    __slots__ = ("_stream", "__weakref__")

    def __init__(self, stream: RequestStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Iteration:
        return self

    def __anext__(self):
        return self._stream.__anext__()

    def __del__(self) -> None:
        stream = self._stream
        if not stream._done:
            stream._done = True
            stream._abort()
