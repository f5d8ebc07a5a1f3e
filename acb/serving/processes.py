"""``acb serve --api-processes N``: the OpenAI server in N processes of its own, the engine in this one.

This process keeps the engine (and its event loop) and serves it on a Unix socket (:class:`~.remote.EngineHost`);
each API process runs :func:`~.app.create_app` over a :class:`~.remote.RemoteEngine` under uvicorn, on the same
TCP port: this process binds and listens, and each API process accepts on that socket (handed over at start), so a
taken port fails here and port 0 picks one port for all. On SIGTERM or SIGINT the API processes stop accepting
connections and the engine closes, draining: open requests finish (up to ``drain_timeout``), what is left ends
with an error, as from the server in one process. :func:`api_processes` serves for the length of an ``async with``
block (benchmarks) and leaves the engine open. An API process that dies takes its open requests with it (the engine
frees their KV blocks) while the others serve on; if every one is gone, serving ends with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable

from .remote import EngineHost, RemoteEngine

__all__ = ["api_processes", "serve_processes"]

_START_TIMEOUT_S = 120.0


def _listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), for every API process to accept on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


@contextlib.asynccontextmanager
async def api_processes(
    engine,
    processes: int,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str | None = None,
    log_level: str = "warning",
    max_body_bytes: int | None = None,
    api_key: str | None = None,
    stream_interval: int = 1,
    timeout_keep_alive: float | None = None,
) -> AsyncIterator[tuple[str, list]]:
    """``processes`` API processes serving the started ``engine`` for the duration of the block, which gets their
    URL and their processes. Leaving the block stops them (each lets its open requests finish, up to the engine's
    ``drain_timeout``); the engine stays open. Raises ``OSError`` when the port cannot be bound and
    ``RuntimeError`` when an API process fails to start. ``timeout_keep_alive``: seconds an idle connection stays
    open (``None``: :data:`~.app.DEFAULT_TIMEOUT_KEEP_ALIVE_S`)."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    from .app import keep_alive_seconds

    timeout_keep_alive = keep_alive_seconds(timeout_keep_alive)
    try:
        listener = _listener(host, port)
    except OSError as exc:
        raise OSError(f"could not serve on {host}:{port}: {exc}") from exc
    port = listener.getsockname()[1]
    model_name = model_name or getattr(engine.model.config, "_name_or_path", None) or "acb-default"
    options = dict(model_name=model_name, log_level=log_level, max_body_bytes=max_body_bytes, api_key=api_key,
                   stream_interval=stream_interval, timeout_keep_alive=timeout_keep_alive,
                   drain_timeout=engine.config.drain_timeout)  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    with listener, tempfile.TemporaryDirectory(prefix="acb-") as private:  # a directory only this user can enter
        path = os.path.join(private, "engine.sock")
        hosted = EngineHost(engine, path)
        await hosted.start()
        ready = ctx.Queue()
        procs = [ctx.Process(target=_api_main, args=(path, listener, options, ready), daemon=True,
                             name=f"acb-api-{i}") for i in range(processes)]  # fmt: skip
        try:
            for p in procs:
                p.start()
            await _started(procs, ready)
            # Each API process has its copy of the listener now. This process's copy would keep the port accepting
            # connections (that no one serves) after the API processes stop accepting, until this process exits.
            listener.close()
            yield f"http://{host}:{port}", procs
        finally:
            for p in procs:  # SIGTERM: each stops accepting and lets its open requests finish
                if p.is_alive():
                    p.terminate()
            await asyncio.to_thread(_join, procs, engine.config.drain_timeout + 5.0)
            await hosted.close()


async def serve_processes(
    engine,
    processes: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    log_level: str = "info",
    max_body_bytes: int | None = None,
    api_key: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    stream_interval: int = 1,
    timeout_keep_alive: float | None = None,
) -> None:
    """Serve the started ``engine`` through ``processes`` API processes until SIGTERM/SIGINT or cancellation, then
    close it; the other arguments as :func:`acb.serving.serve`'s. Raises ``OSError`` when the port cannot be bound,
    and ``RuntimeError`` when an API process fails to start or every one has died."""
    closing = None
    try:
        async with api_processes(engine, processes, host, port, model_name, log_level, max_body_bytes, api_key,
                                 stream_interval, timeout_keep_alive) as (url, procs):  # fmt: skip
            if on_ready is not None:
                on_ready(url)
            await _until_stopped(procs)
            # The engine drains as the API processes do (leaving the block stops them): its requests finish, up to
            # drain_timeout, what is left then ends with an error event, and new requests get 503s meanwhile, as
            # from the server in one process; closing it only after the API processes had exited cut the streams.
            closing = asyncio.ensure_future(engine.close(drain=True))
    finally:  # the drain started above, or (cancelled, an API process failed) a close of its own
        await (closing if closing is not None else engine.close(drain=True))


async def _started(procs: list, ready) -> None:
    """Wait until every API process says it listens; one that dies or reports an error first fails the start."""
    loop = asyncio.get_running_loop()
    waiting = len(procs)
    deadline = loop.time() + _START_TIMEOUT_S
    while waiting:
        try:
            message = await asyncio.to_thread(ready.get, True, 0.2)
        except Exception:  # queue.Empty
            message = None
        if message is not None:
            if message[0] != "ready":
                raise RuntimeError(f"an API process failed to start: {message[1]}")
            waiting -= 1
        elif dead := [p for p in procs if not p.is_alive()]:
            raise RuntimeError(f"API process {dead[0].name} exited with code {dead[0].exitcode} while starting")
        elif loop.time() > deadline:
            raise RuntimeError(f"API processes did not start within {_START_TIMEOUT_S:.0f} s")


async def _until_stopped(procs: list) -> None:
    """Until SIGTERM or SIGINT (or cancellation); an error once no API process is left."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if not any(p.is_alive() for p in procs):
                raise RuntimeError("every API process has exited; see the log above")
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


def _join(procs: list, timeout: float) -> None:
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(5.0)


# -- an API process ------------------------------------------------------------------------------------------------


def _api_main(path: str, listener: socket.socket, options: dict, ready) -> None:
    """The entry point of an API process (spawned)."""
    _end_with_parent()
    try:
        asyncio.run(_api(path, listener, options, ready))
    except Exception as exc:
        ready.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def _end_with_parent() -> None:
    """Linux: get SIGTERM when the engine's process dies, however it dies (``daemon`` covers only a normal exit)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the engine connection's end still stops the server (_api)
    if os.getppid() == 1:  # the parent died before the above took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def _api(path: str, listener: socket.socket, options: dict, ready) -> None:
    import logging

    import uvicorn

    from .app import _quiet_health, create_app, keep_alive_seconds
    from .middleware import DEFAULT_MAX_BODY_BYTES

    remote = await RemoteEngine.connect(path)
    body = DEFAULT_MAX_BODY_BYTES if options["max_body_bytes"] is None else options["max_body_bytes"]
    app = create_app(remote, options["model_name"], max_body_bytes=body, api_key=options["api_key"],
                     stream_interval=options["stream_interval"])  # fmt: skip

    class _Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                ready.put(("ready", os.getpid()))

    logging.getLogger("uvicorn.access").addFilter(_quiet_health)
    config = uvicorn.Config(app, log_level=options["log_level"], loop="none", lifespan="off",
                            timeout_keep_alive=keep_alive_seconds(options["timeout_keep_alive"]),
                            timeout_graceful_shutdown=options["drain_timeout"] + 1.0)  # fmt: skip
    server = _Uvicorn(config)
    # the engine's process gone (its connection ended): stop serving rather than answer 503 for ever
    remote.on_disconnect = lambda: setattr(server, "should_exit", True)
    try:
        await server.serve(sockets=[listener])
    finally:
        listener.close()
        await remote.close()
