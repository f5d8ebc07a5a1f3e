"""Idle keep-alive connections: the server keeps them open longer than common clients do (``--timeout-keep-alive``).

At equal idle times (uvicorn's default 5 s against httpx's, so the openai client's, 5 s) the server closes a
connection just as the client sends a request on it, and the request fails before any response (httpx ``ReadError``,
not retried for a POST): one request in 1,000 of a Poisson benchmark. Rather than wait out a default, these tests
check the value that reaches uvicorn on each path (``serve``, an API process, ``serve_processes``, the command line)
and, with a short value, that the server does close an idle connection after it."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import socket
import tempfile
import time

import httpx
import pytest
import uvicorn

import acb.serving
from acb import Engine, EngineConfig
from acb.cli import build_parser, main
from acb.serving import processes, serve, serve_processes
from acb.serving.app import DEFAULT_TIMEOUT_KEEP_ALIVE_S
from acb.serving.remote import EngineHost

SHORT_S = 0.5


@pytest.fixture
def uvicorn_servers(monkeypatch):
    """Every uvicorn server made during the test (serve and _api subclass ``uvicorn.Server`` when called)."""
    made = []

    class Recording(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            made.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recording)
    return made


async def _idle_close_after(port: int) -> float | None:
    """Seconds until the server closes a connection left idle after one answered request; None: open after 3 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        assert head.startswith("http/1.1 200") and "connection: close" not in head
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        await reader.readexactly(length)
        idle = time.monotonic()
        try:
            assert await asyncio.wait_for(reader.read(1), 3.0) == b""
        except TimeoutError:
            return None
        return time.monotonic() - idle
    finally:
        writer.close()


def test_the_default_outlives_common_clients_idle_expiry():
    assert uvicorn.Config("x:app").timeout_keep_alive == 5  # what acb got before: the clients' value
    assert DEFAULT_TIMEOUT_KEEP_ALIVE_S > 10 * httpx.Limits().keepalive_expiry
    assert build_parser().parse_args(["serve"]).timeout_keep_alive == DEFAULT_TIMEOUT_KEEP_ALIVE_S
    assert build_parser().parse_args(["serve", "--timeout-keep-alive", "120"]).timeout_keep_alive == 120.0


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("given", [None, SHORT_S])
async def test_serve_gives_uvicorn_the_keep_alive(given, make_model, tokenizer, uvicorn_servers):
    model, _ = make_model("llama", seed=5)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        ready = asyncio.get_running_loop().create_future()
        extra = {} if given is None else {"timeout_keep_alive": given}
        task = asyncio.create_task(serve(engine, port=0, log_level="warning", on_ready=ready.set_result, **extra))
        try:
            url = await asyncio.wait_for(ready, 30)
            (server,) = uvicorn_servers
            assert server.config.timeout_keep_alive == (given or DEFAULT_TIMEOUT_KEEP_ALIVE_S)
            if given:
                closed = await _idle_close_after(int(url.rsplit(":", 1)[1]))
                assert closed is not None and 0.5 * given < closed < given + 1.0
        finally:
            for server in uvicorn_servers:
                server.should_exit = True
            await task


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("given", [None, SHORT_S])
async def test_an_api_process_gives_uvicorn_the_keep_alive(given, make_model, tokenizer, uvicorn_servers):
    """``_api`` (an API process's work) on this loop, over a real engine host."""
    model, _ = make_model("llama", seed=5)
    private = tempfile.mkdtemp(prefix="acb-test-")  # short: a Unix socket's path has ~100 bytes
    try:
        async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
            host = EngineHost(engine, os.path.join(private, "engine.sock"))
            await host.start()
            listener = socket.create_server(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            options = dict(model_name="tiny", log_level="warning", max_body_bytes=None, api_key=None,
                           stream_interval=1, timeout_keep_alive=given, drain_timeout=1.0)  # fmt: skip
            ready: queue.Queue = queue.Queue()
            task = asyncio.create_task(processes._api(host.path, listener, options, ready))
            try:
                for _ in range(3000):
                    if not ready.empty() or task.done():
                        break
                    await asyncio.sleep(0.01)
                assert ready.get_nowait()[0] == "ready"
                (server,) = uvicorn_servers
                assert server.config.timeout_keep_alive == (given or DEFAULT_TIMEOUT_KEEP_ALIVE_S)
                if given:
                    closed = await _idle_close_after(port)
                    assert closed is not None and 0.5 * given < closed < given + 1.0
            finally:
                for server in uvicorn_servers:
                    server.should_exit = True
                await task
                await host.close()
    finally:
        shutil.rmtree(private, ignore_errors=True)


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("given", [None, SHORT_S])
async def test_serve_processes_hands_the_keep_alive_to_its_processes(given, make_model, tokenizer, monkeypatch):
    """What each API process is started with (a stand-in process records it instead of starting)."""
    started = []

    class Recorded(Exception):
        pass

    class FakeProcess:
        def __init__(self, target, args, **kwargs):
            self.args, self.name, self.exitcode = args, kwargs.get("name"), None

        def start(self):
            started.append(self.args[2])
            raise Recorded

        def is_alive(self):
            return False

        def join(self, timeout=None):
            pass

    context = type("Context", (), {"Process": FakeProcess, "Queue": queue.Queue})
    monkeypatch.setattr(processes.multiprocessing, "get_context", lambda method: context)
    model, _ = make_model("llama", seed=5)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    await engine.start()
    extra = {} if given is None else {"timeout_keep_alive": given}
    with pytest.raises(Recorded):
        await serve_processes(engine, 2, port=0, **extra)
    assert [options["timeout_keep_alive"] for options in started] == [given or DEFAULT_TIMEOUT_KEEP_ALIVE_S]


@pytest.mark.parametrize("processes_", [0, 2])
def test_acb_serve_passes_timeout_keep_alive(processes_, monkeypatch):
    seen = {}

    async def record(engine, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(acb.serving, "serve_processes" if processes_ else "serve", record)
    assert main(["serve", "--device", "cpu", "--api-processes", str(processes_), "--timeout-keep-alive", "42"]) == 0
    assert seen["timeout_keep_alive"] == 42.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "75", True])
async def test_serve_and_api_processes_refuse_a_keep_alive_that_is_not_seconds(bad, make_model, tokenizer):
    """uvicorn would take them: ``None`` breaks every response, a negative time drops each connection after one."""
    model, _ = make_model("llama", seed=5)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        with pytest.raises(ValueError, match="timeout_keep_alive"):
            await serve(engine, port=0, log_level="warning", timeout_keep_alive=bad)
        with pytest.raises(ValueError, match="timeout_keep_alive"):
            async with processes.api_processes(engine, 1, port=0, timeout_keep_alive=bad):
                pass
