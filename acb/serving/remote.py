"""The engine's API across processes: the HTTP server's work off the engine's event loop.

Served in one process, the OpenAI server and the engine share one event loop, and at a few thousand streamed tokens
per second the server's writes (HTTP framing, a syscall per token per client) cost as much loop time as the
engine's own host work (docs/benchmarks.md, W-serve). ``acb serve --api-processes N`` moves the HTTP side into N
processes that each run the same app (:func:`acb.serving.create_app`) over a :class:`RemoteEngine`, which talks to
the engine's process through a Unix socket, served there by :class:`EngineHost`.

The wire: frames of a 4-byte length and a pickled list of messages (tuples). Each side batches what it has to send
in one loop iteration into one frame, so the engine pays one write per iteration per API process, not one per
token. The socket lives in a directory only the user can enter, and its peers are this user's own processes:
pickle is safe among them, and nowhere else. API process to engine::

    ("submit", rid, prompt, params, stream_interval, choices)   admit (``choices``: params.n samples, own streams)
    ("abort", rid)                                                end a request (or each of its samples)
    ("chat", call, messages)                                      render a chat with the engine's template
    ("counters", call, snapshot)                                  the app's HTTP counts (call 0: no reply wanted)

engine to API process::

    ("hello", info)                          once: tokenizer, default params, drain timeout, state and stats
    ("admitted", rid, [(id, prompt_tokens)]) the request's streams exist (one per sample)
    ("refused", rid, error)                  admission raised (a typed acb error, rebuilt on the other side)
    ("tokens", id, [Token, ...])             what a stream delivered since the last frame
    ("failed", id, error)                    a stream ended with an error
    ("reply", call, value, error)            a chat rendering's result, or every API process's counts summed
    ("state", state, stats)                  the engine's state and load, on change and twice a second
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from .. import errors
from ..errors import AcbError, DuplicateRequestIdError, EngineClosedError
from .metrics import merge
from .wire import Outbox, read, rebuilt, wire_error

__all__ = ["EngineHost", "RemoteEngine", "RemoteStream"]

_STATE_EVERY_S = 0.5


# -- the engine's side ---------------------------------------------------------------------------------------------


class EngineHost:
    """Serves ``engine`` (started, on this loop) to API processes on the Unix socket ``path``."""

    def __init__(self, engine, path: str) -> None:
        self.engine, self.path = engine, path
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self.counters: dict[int, list] = {}  # each API process's latest HTTP counts, kept after it ends
        self._connections = itertools.count()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def close(self) -> None:
        """Stop accepting API processes and end every request they have open."""
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers):
            await peer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _Peer(self.engine, writer, self.counters, next(self._connections))
        self._peers.add(peer)
        try:
            while (frame := await read(reader)) is not None:
                for message in frame:
                    peer.handle(message)
        finally:
            self._peers.discard(peer)
            await peer.close()


class _Peer:
    """One API process's connection: its requests' streams, each forwarded by a task of its own."""

    def __init__(self, engine, writer: asyncio.StreamWriter, counters: dict[int, list], number: int) -> None:
        self.engine, self.writer = engine, writer
        self._counters, self._number = counters, number
        self.out = Outbox(writer, drop_unread=True)
        self._tasks: dict[str, asyncio.Task] = {}  # request id -> its admission, then its forwarding
        self.out.send(
            ("hello", {"tokenizer": engine.tokenizer, "default_params": engine.default_params,
                       "drain_timeout": engine.config.drain_timeout, "state": engine.state, "stats": engine.stats()})
        )  # fmt: skip
        self._reporter = asyncio.ensure_future(self._report())

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            _, rid, prompt, params, interval, choices = message
            if rid in self._tasks:  # a client's duplicate id: the engine refuses it as it would in-process
                self.out.send(("refused", rid, wire_error(errors.DuplicateRequestIdError(f"duplicate {rid!r}"))))
                return
            task = self._tasks[rid] = asyncio.ensure_future(self._run(rid, prompt, params, interval, choices))
            # forgotten when it ends, also when cancelled before it ever ran (then its finally never runs)
            task.add_done_callback(lambda t, rid=rid: self._tasks.pop(rid, None) if self._tasks.get(rid) is t else None)
        elif kind == "abort":
            task = self._tasks.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "chat":
            asyncio.ensure_future(self._chat(message[1], message[2]))
        elif kind == "counters":
            self._counters[self._number] = message[2]
            if message[1]:
                self.out.send(("reply", message[1], merge(list(self._counters.values())), None))

    async def _run(self, rid: str, prompt, params, interval: int, choices: bool) -> None:
        streams = []
        try:
            try:
                if choices:
                    streams = await self.engine.submit_choices(prompt, params, request_id=rid, stream_interval=interval)
                else:
                    streams = [await self.engine.submit(prompt, params, request_id=rid, stream_interval=interval)]
            except AcbError as exc:
                self.out.send(("refused", rid, wire_error(exc)))
                return
            self.out.send(("admitted", rid, [(s.request_id, s.num_prompt_tokens) for s in streams]))
            await asyncio.gather(*(self._forward(s) for s in streams))
        finally:  # done, aborted by the API process, or the connection ended: free what is left
            for s in streams:
                await s.aclose()

    async def _forward(self, stream) -> None:
        """Hand on what ``stream`` delivers: everything that waits goes in one message."""
        try:
            while True:
                tok = await stream.__anext__()
                batch = [tok]
                while tok.finish_reason is None and stream.num_ready:
                    tok = await stream.__anext__()
                    batch.append(tok)
                self.out.send(("tokens", stream.request_id, batch))
                if tok.finish_reason is not None:
                    return
        except StopAsyncIteration:
            return
        except Exception as exc:  # the request failed (the engine serves on)
            self.out.send(("failed", stream.request_id, wire_error(exc)))

    async def _chat(self, call: int, messages: list) -> None:
        try:
            self.out.send(("reply", call, await self.engine.apply_chat_template(messages), None))
        except Exception as exc:  # every call gets its reply (anything but acb's own errors as a failed request)
            self.out.send(("reply", call, None, wire_error(exc)))

    async def _report(self) -> None:
        """The engine's state as soon as it changes (checked every 50 ms), with its load at least every
        :data:`_STATE_EVERY_S`."""
        loop = asyncio.get_running_loop()
        sent, due = None, 0.0
        while True:
            state = self.engine.state
            if state != sent or loop.time() >= due:
                self.out.send(("state", state, self.engine.stats()))
                sent, due = state, loop.time() + _STATE_EVERY_S
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._reporter.cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(self._reporter, *tasks, return_exceptions=True)
        self.writer.close()


# -- the API process's side ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    drain_timeout: float


class RemoteEngine:
    """What :func:`acb.serving.create_app` uses of an :class:`acb.Engine`, served by an engine in another process
    (:class:`EngineHost`). Built with :meth:`connect`; the engine's typed errors are raised here as they would be
    in-process; if the engine's process goes away, every open request fails with :class:`EngineClosedError`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict) -> None:
        self._reader, self.out = reader, Outbox(writer, drop_unread=False)
        self.tokenizer = hello["tokenizer"]
        self.default_params = hello["default_params"]
        self.config = _Config(hello["drain_timeout"])
        self.state, self._stats = hello["state"], hello["stats"]
        self._admissions: dict[str, asyncio.Future] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._streams: dict[str, RemoteStream] = {}
        self._next_call = 0
        self.on_disconnect: Callable[[], None] | None = None  # called once the engine's connection has ended
        self._counts: Callable[[], list] | None = None  # the app's HTTP counts (share_counters)
        self._reading = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, path: str) -> RemoteEngine:
        reader, writer = await asyncio.open_unix_connection(path)
        hello = await read(reader)
        if not hello or hello[0][0] != "hello":
            writer.close()
            raise EngineClosedError(f"no engine answered on {path}")
        return cls(reader, writer, hello[0][1])

    @property
    def running(self) -> bool:
        return self.state == "running"

    def stats(self):
        """The engine's load as last reported (at most half a second old)."""
        return self._stats

    async def submit(self, prompt, params=None, *, request_id: str, stream_interval: int = 1) -> RemoteStream:
        return (await self._admit(prompt, params, request_id, stream_interval, False))[0]

    async def submit_choices(self, prompt, params=None, *, request_id: str, stream_interval: int = 1):
        return await self._admit(prompt, params, request_id, stream_interval, True)

    def _check_running(self) -> None:
        if self._reading.done() or not self.running:
            raise EngineClosedError(f"the engine is not running (it is {self.state})")

    async def _admit(self, prompt, params, rid: str, interval: int, choices: bool) -> list[RemoteStream]:
        await self.out.room()
        self._check_running()
        if rid in self._admissions or rid in self._streams:
            raise DuplicateRequestIdError(f"request_id {rid!r} is already in use")
        admitted = self._admissions[rid] = asyncio.get_running_loop().create_future()
        self.out.send(("submit", rid, prompt, params, interval, choices))
        try:
            return await admitted
        except asyncio.CancelledError:  # the handler went away while the engine admitted: end what it admits
            self.out.send(("abort", rid))
            if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
                for stream in admitted.result():  # admitted just before: nobody will read these
                    stream._finish()
            raise
        finally:
            self._admissions.pop(rid, None)

    async def apply_chat_template(self, messages: list[dict]) -> str:
        self._check_running()
        return await self._call("chat", messages)

    def share_counters(self, counts: Callable[[], list]) -> None:
        """Send ``counts()`` (:meth:`acb.serving.metrics.ServerMetrics.snapshot`) to the engine's process twice a
        second, so that every API process's scrape answers the sum of them all (:meth:`server_counters`)."""
        self._counts = counts

    async def server_counters(self, mine: list) -> list:
        """Every API process's HTTP counts summed, ``mine`` (this process's, now) among them: also while the engine
        drains or after it closed, as long as its process is there."""
        return await self._call("counters", mine)

    async def _call(self, kind: str, payload):
        """Send ``(kind, call, payload)`` and return the engine's reply to it (or raise its error)."""
        await self.out.room()
        if self._reading.done():
            raise EngineClosedError("the engine's process is gone")
        call = self._next_call = self._next_call + 1
        reply = self._calls[call] = asyncio.get_running_loop().create_future()
        self.out.send((kind, call, payload))
        try:
            return await reply
        finally:
            self._calls.pop(call, None)

    async def close(self, drain: bool = True) -> None:
        """Drop the connection (the engine ends this process's open requests)."""
        self.out.writer.close()
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)

    def _abort(self, rid: str) -> None:
        self.out.send(("abort", rid))

    async def _read_loop(self) -> None:
        try:
            while (frame := await read(self._reader)) is not None:
                for message in frame:
                    self._receive(message)
        finally:
            self.state = "closed"
            gone = EngineClosedError("the engine's process is gone")
            for fut in [*self._admissions.values(), *self._calls.values()]:
                if not fut.done():
                    fut.set_exception(gone)
            for stream in list(self._streams.values()):
                stream._put(gone)
            if self.on_disconnect is not None:
                self.on_disconnect()

    def _receive(self, message: tuple) -> None:
        kind = message[0]
        if kind == "tokens":
            stream = self._streams.get(message[1])
            if stream is not None:
                stream._put_many(message[2])
        elif kind == "admitted":
            rid, made = message[1], message[2]
            streams = [RemoteStream(self, sid, rid, n) for sid, n in made]
            self._streams.update((s.request_id, s) for s in streams)
            fut = self._admissions.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(streams)
            else:  # nobody waits any more (the handler was cancelled): the abort is on its way
                for s in streams:
                    s._finish()
        elif kind == "refused":
            fut = self._admissions.get(message[1])
            if fut is not None and not fut.done():
                fut.set_exception(rebuilt(message[2]))
        elif kind == "failed":
            stream = self._streams.get(message[1])
            if stream is not None:
                stream._put(rebuilt(message[2]))
        elif kind == "reply":
            fut = self._calls.get(message[1])
            if fut is not None and not fut.done():
                fut.set_exception(rebuilt(message[3])) if message[3] else fut.set_result(message[2])
        elif kind == "state":
            self.state, self._stats = message[1], message[2]
            if self._counts is not None:  # this app's counts go with the engine's reports
                self.out.send(("counters", 0, self._counts()))


class RemoteStream:
    """One request's (or one sample's) tokens, as :class:`acb.RequestStream` gives them: ``async for``,
    ``num_ready``, ``num_prompt_tokens``, :meth:`aclose` (which ends the request in the engine's process)."""

    def __init__(self, remote: RemoteEngine, request_id: str, rid: str, num_prompt_tokens: int) -> None:
        self._remote, self.request_id, self._rid = remote, request_id, rid
        self.num_prompt_tokens = num_prompt_tokens
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._done = False  # the last item was read, or the consumer closed it

    @property
    def num_ready(self) -> int:
        return len(self._items)

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self):
        while not self._items:
            if self._done:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                await self.aclose()
                raise
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._finish()
            raise item
        if item.finish_reason is not None:
            self._finish()
        return item

    def _put_many(self, items: list) -> None:
        self._items.extend(items)
        if items[-1].finish_reason is not None:  # complete: nothing more comes, nothing to abort
            self._remote._streams.pop(self.request_id, None)
        self._wake()

    def _put(self, item) -> None:
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _finish(self) -> None:
        self._done = True
        self._remote._streams.pop(self.request_id, None)

    async def aclose(self) -> None:
        """End the request if it still runs (its KV blocks are freed in the engine's process)."""
        if self._remote._streams.pop(self.request_id, None) is not None and not self._done:
            self._remote._abort(self._rid)  # the whole request: the server closes a request's samples together
        self._done = True
        with contextlib.suppress(Exception):
            self._wake()
