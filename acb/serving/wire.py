"""The wire between the engine's process and its API processes (:mod:`.remote`): frames of a 4-byte length and a
pickled list of messages, each side's :class:`Outbox` batching what it sends in one loop iteration into one frame,
and acb's typed errors as the frames carry them."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct

from .. import errors
from ..errors import AcbError, RequestFailedError

__all__ = ["MAX_UNSENT_BYTES", "Outbox", "read", "wire_error", "rebuilt"]

_HEADER = struct.Struct("!I")
MAX_UNSENT_BYTES = 64 << 20
"""Most bytes waiting for a peer that does not read (at W-serve's rates, over a minute of its tokens)."""


async def read(reader: asyncio.StreamReader) -> list | None:
    """The next frame's messages, or None at the end of the connection."""
    try:
        header = await reader.readexactly(_HEADER.size)
        return pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class Outbox:
    """Messages for one peer, written as one frame per loop iteration.

    The engine's side (``drop_unread``) drops an API process that stops reading (a stopped or hung process) once
    :data:`MAX_UNSENT_BYTES` wait for it, rather than growing the engine's memory: its requests end as if it had
    died. The API side never drops its engine: what it sends are requests' prompts and chats (up to the body limit
    each), which its handlers hold back with :meth:`room` while that much waits, so that a burst of large requests is
    slowed, not turned into a lost engine."""

    def __init__(self, writer: asyncio.StreamWriter, drop_unread: bool) -> None:
        self.writer, self._drop_unread = writer, drop_unread
        self._messages: list = []
        writer.transport.set_write_buffer_limits(high=MAX_UNSENT_BYTES)

    def send(self, message: tuple) -> None:
        if not self._messages:
            asyncio.get_running_loop().call_soon(self._flush)
        self._messages.append(message)

    async def room(self) -> None:
        """Wait while more than :data:`MAX_UNSENT_BYTES` wait for the peer (until a quarter of it is left)."""
        with contextlib.suppress(ConnectionError):  # a lost peer: the read loop ends what waits on it
            await self.writer.drain()

    def _flush(self) -> None:
        data, self._messages = pickle.dumps(self._messages, pickle.HIGHEST_PROTOCOL), []
        if not self.writer.is_closing():
            self.writer.write(_HEADER.pack(len(data)) + data)
            if self._drop_unread and self.writer.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
                self.writer.transport.abort()


def wire_error(exc: BaseException) -> tuple[str, str, str | None]:
    """An error as the wire carries it: acb's own by class name (the other side raises the same class), anything
    else as a failed request."""
    name = type(exc).__name__ if isinstance(exc, AcbError) and hasattr(errors, type(exc).__name__) else ""
    return name or "RequestFailedError", str(exc) or type(exc).__name__, getattr(exc, "param", None)


def rebuilt(wire: tuple[str, str, str | None]) -> AcbError:
    name, message, param = wire
    cls = getattr(errors, name, RequestFailedError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if param is not None:
        exc.param = param
    return exc
