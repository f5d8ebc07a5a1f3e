"""The seam between acb and the event loop: the few things the engine needs, on asyncio (and uvloop) and on trio.

anyio covers most of it (sleeping, semaphores, worker threads, timeouts); this module holds the rest, which anyio
does not offer in the form a long-lived engine needs:

- :class:`Loop`: the running loop as the engine keeps it: an identity (to refuse callers from another loop), a
  non-blocking hand-over from any thread (a stream's finalizer may run on another thread), and background tasks that
  live from ``start()`` to ``close()``, outside any task group of the caller's (on trio: system tasks, each in a
  cancel scope of its own);
- :class:`Waiter`: a one-shot wake-up set from the loop thread and awaited by one task; on asyncio a bare future, the
  lightest thing that suspends a task, which matters at one wake-up per token;
- :class:`Signal` and :class:`Mailbox`: a clearable event and an unbounded queue built on waiters.

Everything here is called from the loop's thread, except :meth:`Loop.call_soon_threadsafe` and
:func:`wait_future`'s callback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = [
    "Loop",
    "Waiter",
    "Signal",
    "Slots",
    "Mailbox",
    "current_loop",
    "run_to_end",
    "wait_future",
    "cancelled_exc_class",
]


def _library() -> str | None:
    """``"asyncio"`` or ``"trio"``: what runs the calling task (None outside both). trio is only looked for where it
    was imported: an asyncio program never pays for it."""
    try:
        asyncio.get_running_loop()
        return "asyncio"
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
            return "trio"
        except RuntimeError:
            pass
    return None


class Waiter:
    """One task awaits it, the loop thread resolves it (trio's flavour; asyncio uses a plain future)."""

    __slots__ = ("_event", "_done")

    def __init__(self) -> None:
        import trio

        self._event = trio.Event()
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, _value: object = None) -> None:
        self._done = True
        self._event.set()

    def __await__(self):
        return self._event.wait().__await__()


class Loop:
    """The running event loop as an engine holds it (see the module doc). Build with :func:`current_loop`."""

    def __init__(self) -> None:
        self.library = _library()
        if self.library == "asyncio":
            self._asyncio = asyncio.get_running_loop()
            self.identity: object = self._asyncio
        elif self.library == "trio":
            import trio

            self._trio_token = trio.lowlevel.current_trio_token()
            self.identity = self._trio_token
        else:
            raise RuntimeError(f"acb runs on asyncio (and uvloop) or trio, not on {self.library!r}")

    def is_current(self) -> bool:
        """Whether the caller runs on this loop (cheap: one lookup of the running loop)."""
        if self.library == "asyncio":
            try:
                return asyncio.get_running_loop() is self._asyncio
            except RuntimeError:
                return False
        try:
            import trio

            return trio.lowlevel.current_trio_token() is self._trio_token
        except RuntimeError:
            return False

    def is_closed(self) -> bool:
        return self._asyncio.is_closed() if self.library == "asyncio" else False

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args) -> None:
        """Run ``fn(*args)`` on the loop soon, from any thread; never blocks. Silently dropped if the loop is gone."""
        try:
            if self.library == "asyncio":
                self._asyncio.call_soon_threadsafe(fn, *args)
            else:
                self._trio_token.run_sync_soon(fn, *args)
        except RuntimeError:  # the loop closed: nothing is left to act on
            pass

    def waiter(self):
        """A fresh :class:`Waiter` (an ``asyncio.Future`` on asyncio)."""
        if self.library == "asyncio":
            return self._asyncio.create_future()
        return Waiter()

    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> Task:
        """Run ``fn()`` as a background task until it returns or :meth:`Task.cancel` is called."""
        return Task(self, fn, name)


class Task:
    """A background task of the engine's (see :meth:`Loop.spawn`)."""

    def __init__(self, loop: Loop, fn: Callable[[], Awaitable[None]], name: str) -> None:
        self.name = name
        self._finished = Signal(loop)
        if loop.library == "asyncio":
            self._task = loop._asyncio.create_task(fn(), name=name)
            self._scope = None
        else:
            import trio

            self._scope = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._run_trio, fn, name=name)

    async def _run_trio(self, fn) -> None:
        with self._scope:
            try:
                await fn()
            except BaseException:  # a system task must not raise; the engine's stages report their own crashes
                pass
            finally:
                self._finished.set()

    def cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        else:
            self._task.cancel()

    def done(self) -> bool:
        return self._task.done() if self._scope is None else self._finished.is_set()

    async def wait(self) -> None:
        """Wait until the task ended (however it ended: a task cancelled before it ran never runs its body)."""
        if self._scope is None:
            await asyncio.gather(self._task, return_exceptions=True)
        else:
            await self._finished.wait()


class Signal:
    """A clearable event on one loop (``asyncio.Event`` semantics, on either library)."""

    __slots__ = ("_loop", "_set", "_waiters")

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._set = False
        self._waiters: list = []

    def set(self) -> None:
        if not self._set:
            self._set = True
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if self._set:
            return
        w = self._loop.waiter()
        self._waiters.append(w)
        try:
            await w
        finally:
            if not self._set:  # cancelled: forget the waiter (a caller may wait again and again with a timeout)
                self._waiters.remove(w)


class Slots:
    """A counting semaphore on one loop that, unlike ``anyio.Semaphore``, does not yield to the loop when a slot is
    free (the step loop takes one per step)."""

    __slots__ = ("_loop", "_free", "_waiters")

    def __init__(self, loop: Loop, n: int) -> None:
        self._loop = loop
        self._free = n
        self._waiters: deque = deque()

    async def acquire(self) -> None:
        while self._free == 0:
            w = self._loop.waiter()
            self._waiters.append(w)
            await w
        self._free -= 1

    def release(self) -> None:
        self._free += 1
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                break


class Mailbox:
    """An unbounded queue with one consumer at a time (the engine's queues between stages)."""

    __slots__ = ("_loop", "_items", "_waiter")

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._items: deque = deque()
        self._waiter = None

    def put_nowait(self, item) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self):
        while not self._items:
            self._waiter = self._loop.waiter()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def qsize(self) -> int:
        return len(self._items)


def current_loop() -> Loop:
    return Loop()


async def run_to_end(fn: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``fn()`` to its end, in a task of its own on the running loop, however often the caller is cancelled
    meanwhile; then raise ``fn``'s error, or else the caller's cancellation, if any. (anyio's shields stop only
    cancellations of anyio's and trio's kind: asyncio's own, a timeout around the caller or Ctrl-C, would go through
    them; here they stop the caller's wait, never ``fn``.)"""
    failed: list[BaseException] = []

    async def body() -> None:
        try:
            await fn()
        except BaseException as exc:  # raised in the caller once the task ended
            failed.append(exc)

    task = current_loop().spawn(body, name)
    cancelled = None
    if task._scope is None:  # asyncio: asyncio.wait leaves the task alone when the caller is cancelled
        while not task._task.done():
            try:
                await asyncio.wait({task._task})
            except asyncio.CancelledError as exc:
                cancelled = exc
    else:
        with anyio.CancelScope(shield=True):
            await task.wait()
    if failed:
        raise failed[0]
    if cancelled is not None:
        raise cancelled


async def wait_future(
    loop: Loop, future: concurrent.futures.Future, watch: Callable[[], None] | None = None, every: float = 0.005
):
    """Await a ``concurrent.futures.Future`` (a worker thread's result) from the loop, without blocking it. With a
    ``watch``, call it every ``every`` seconds while waiting: it raises to stop waiting (the result may never come)."""
    if not future.done():
        if watch is None:
            w = loop.waiter()
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(_resolve, w))
            await w
        else:
            done = Signal(loop)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
            while not done.is_set():
                watch()
                with anyio.move_on_after(every):
                    await done.wait()
    return future.result()


def _resolve(waiter) -> None:
    if not waiter.done():
        waiter.set_result(None)


def cancelled_exc_class() -> type[BaseException]:
    """The running library's cancellation exception (``asyncio.CancelledError``, ``trio.Cancelled``)."""
    import anyio

    return anyio.get_cancelled_exc_class()
