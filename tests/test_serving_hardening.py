"""The server under an adversarial client: bad values get a 400 and never touch other clients' streams, large
bodies are refused before they are read, clients that leave early free their requests, and SIGTERM drains within
``drain_timeout``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import uvicorn
from soak import POISON, poison

from acb import Engine, EngineConfig, PromptTooLongError
from acb.serving import create_app


@contextlib.asynccontextmanager
async def serving(engine: Engine, **app_kwargs):
    async with engine:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(engine, "tiny", **app_kwargs), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
            )
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task


async def _stream_text(http: httpx.AsyncClient, body: dict) -> tuple[str, list[dict]]:
    chunks = []
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    return "".join(c["choices"][0]["text"] for c in chunks if "choices" in c and c["choices"]), chunks


BAD_BODIES = [
    ({"top_k": 9223372036854775808}, "top_k"),
    ({"temperature": 1e39}, "temperature"),
    ({"stop": ["x"] * 10_000}, "stop"),
    ({"stop": ["y" * 100_000]}, "stop"),
    ({"stop_token_ids": [2**70]}, "stop_token_ids"),
    ({"prompt": "bad \ud800 text"}, "prompt"),
]


async def test_bad_values_get_a_400_and_never_touch_other_streams(make_model, tokenizer):
    model, _ = make_model("llama", seed=91)
    async with serving(Engine(model, tokenizer)) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        innocent = {"prompt": "an innocent story", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        want, _ = await _stream_text(http, innocent)

        async def bad(extra: dict) -> httpx.Response:
            raw = json.dumps({"prompt": "x", "max_tokens": 5, **extra})  # ASCII: a lone surrogate travels escaped
            return await http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})

        results = await asyncio.gather(
            *(_stream_text(http, innocent) for _ in range(6)), *(bad(body) for body, _ in BAD_BODIES)
        )
        for text, chunks in results[:6]:
            assert text == want and all("error" not in c for c in chunks)
        for r, (_, param) in zip(results[6:], BAD_BODIES):
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param


async def test_large_bodies_are_refused_before_they_are_read(make_model, tokenizer):
    model, _ = make_model("llama")
    async with serving(Engine(model, tokenizer), max_body_bytes=10_000) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            big = json.dumps({"prompt": "x" * 20_000, "max_tokens": 2}).encode()
            r = await http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

            # No Content-Length: the body is counted as it arrives, and refused once past the limit, without
            # waiting for the rest (this client never sends the end of its body).
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + b"3e8\r\n" + b" " * 1000 + b"\r\n"
            )
            for _ in range(11):
                writer.write(b"3e8\r\n" + b" " * 1000 + b"\r\n")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.startswith(b"HTTP/1.1 413"), status
            writer.close()
            ok = await http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
            assert ok.status_code == 200
            metrics = (await http.get("/metrics")).text
        assert 'acb_http_requests_total{endpoint="/v1/completions",status="413"} 1.0' in metrics
        assert 'acb_http_requests_total{endpoint="/v1/chat/completions",status="413"} 1.0' in metrics


async def test_a_chat_over_max_prompt_chars_with_its_template_gets_a_400_saying_so(make_model, tokenizer):
    """Contents under ``max_prompt_chars``, rendered prompt over it: one 400 that names the limit and the template
    (the message the engine's own ``PromptTooLongError`` carries)."""
    model, _ = make_model("llama")
    engine = Engine(model, tokenizer, EngineConfig(max_prompt_chars=1000))
    async with serving(engine) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        near = [{"role": "user", "content": "y" * 990}]
        r = await http.post("/v1/chat/completions", json={"messages": near, "max_tokens": 2})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["type"], err["param"]) == ("invalid_request_error", "messages")
        with pytest.raises(PromptTooLongError) as info:
            await engine.apply_chat_template(near)
        assert err["message"] == str(info.value) and "chat template" in err["message"]
        assert "max_prompt_chars" in err["message"]
        ok = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200, ok.text


async def test_a_client_that_leaves_before_its_first_token_frees_its_request(make_model, tokenizer):
    model, _ = make_model("llama")
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=1))
    async with serving(engine) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        hog = asyncio.create_task(
            http.post("/v1/completions", json={"prompt": "hog", "max_tokens": 1500, "ignore_eos": True})
        )
        while engine.stats().num_running == 0:
            await asyncio.sleep(0.01)
        for stream in (False, True):
            async with httpx.AsyncClient(base_url=url, timeout=0.3) as quitter:
                with pytest.raises(httpx.ReadTimeout):
                    body = {"prompt": "queued", "max_tokens": 5, "stream": stream}
                    await quitter.post("/v1/completions", json=body)
            for _ in range(100):
                if engine.stats().num_waiting == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.stats().num_waiting == 0  # aborted while queued, never prefilled
            assert engine.stats().num_running == 1  # the hog keeps its slot
        metrics = (await http.get("/metrics")).text
        assert 'acb_http_requests_total{endpoint="/v1/completions",status="499"} 2.0' in metrics
        assert 'status="200"' not in metrics
        hog.cancel()


async def test_non_finite_logits_with_logprobs_give_valid_json_errors(make_model, tokenizer):
    model, _ = make_model("llama", seed=93)
    poison(model)
    async with serving(Engine(model, tokenizer)) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        body = {"prompt": [7, POISON, 9], "max_tokens": 5, "logprobs": 0}
        plain, good = await asyncio.gather(
            http.post("/v1/completions", json=body),
            http.post("/v1/completions", json={"prompt": [7, 8, 9], "max_tokens": 5, "logprobs": 0}),
        )
        assert plain.status_code == 500 and "non-finite" in plain.json()["error"]["message"]
        assert good.status_code == 200 and len(good.json()["choices"][0]["logprobs"]["token_logprobs"]) == 5
        streamed = await http.post("/v1/completions", json={**body, "stream": True})  # fails before its first byte
        assert streamed.status_code == 500 and "non-finite" in streamed.json()["error"]["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_within_drain_timeout():
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "acb.cli", "serve", "--port", str(port), "--device", "cpu", "--drain-timeout", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"prompt": "a very long story", "max_tokens": 1800, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            tail = list(lines)  # the stream ends: finished, or failed by the closing engine
        proc.wait(timeout=30)
        took = time.monotonic() - t0
        assert took < 8, took  # drain_timeout=1 plus start-up slack, not the 1,800 tokens
        assert tail and tail[-1] in ("data: [DONE]", "") or any("error" in t for t in tail)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
