"""The OpenAI server apart from the engine's process (acb/serving/remote.py, processes.py).

Here the API side (:class:`RemoteEngine` under the same app and uvicorn) runs on the test's loop but reaches the
engine only through the Unix socket, so every message crosses the wire as between processes; tests/test_cli.py
runs ``acb serve --api-processes 2`` as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile

import httpx
import pytest
import uvicorn

from acb import Engine, EngineConfig
from acb.serving import create_app
from acb.serving.remote import EngineHost, RemoteEngine


async def _uvicorn(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


@pytest.fixture
async def split(make_model, tokenizer):
    """``(engine, remote, url of the app over the remote engine, url of the app over the engine itself, the engine's
    socket)``."""
    model, _ = make_model("llama", seed=83)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, max_model_len=256))
    private = tempfile.mkdtemp(prefix="acb-test-")  # short: a Unix socket's path has ~100 bytes
    async with engine:
        host = EngineHost(engine, os.path.join(private, "engine.sock"))
        await host.start()
        remote = await RemoteEngine.connect(host.path)
        servers = [await _uvicorn(create_app(remote, "tiny")), await _uvicorn(create_app(engine, "tiny"))]
        yield engine, remote, servers[0][2], servers[1][2], host.path
        for server, task, _ in servers:
            server.should_exit = True
            await task
        await remote.close()
        await host.close()
    shutil.rmtree(private, ignore_errors=True)


async def _settle(engine: Engine) -> bool:
    for _ in range(300):
        s = engine.stats()
        if s.kv_blocks_free == s.kv_blocks_total and s.num_running == 0 and s.num_waiting == 0:
            return True
        await asyncio.sleep(0.01)
    return False


def _same(body):
    """A body without its id and creation time, logprobs to 4 decimals (the two servers' requests run in
    different batches, which moves float32 sums in their last bits)."""
    if isinstance(body, dict):
        return {k: _same(v) for k, v in body.items() if k not in ("id", "created")}
    if isinstance(body, list):
        return [_same(v) for v in body]
    return round(body, 4) if isinstance(body, float) else body


async def _events(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """A streamed response's events per choice, in order (choices interleave as their tokens happen to arrive),
    and its usage."""
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    per_choice: dict = {}
    for line in lines[:-1]:
        event = _same(json.loads(line[6:]))
        for choice in event["choices"]:
            per_choice.setdefault(choice["index"], []).append(choice)
        if event.get("usage"):
            per_choice["usage"] = event["usage"]
    return per_choice


BODIES = [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"prompt": ["a b c", "d e f"], "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    ("/v1/completions", {"prompt": "x y", "max_tokens": 5, "n": 3, "seed": 7, "temperature": 0.9}),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 9,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),  # fmt: skip
    ("/v1/completions", {"prompt": "the end", "max_tokens": 20, "temperature": 0, "stop": [" a", "b"]}),
]


@pytest.mark.parametrize("path, body", BODIES)
async def test_the_api_across_processes_answers_as_the_engines_own(split, path, body):
    """Plain and streamed, several prompts, samples, logprobs, chat, stop strings: the same bodies (greedy and
    seeded sampling are deterministic), the same usage."""
    engine, _, remote_url, local_url, _ = split
    async with httpx.AsyncClient(timeout=60) as client:
        got = await client.post(remote_url + path, json=body)
        want = await client.post(local_url + path, json=body)
        assert got.status_code == want.status_code == 200
        assert _same(got.json()) == _same(want.json())
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        assert await _events(client, remote_url + path, stream) == await _events(client, local_url + path, stream)
    assert await _settle(engine)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": [[5, 10**9]], "max_tokens": 4},  # a token id outside the vocabulary: refused at admission
        {"prompt": "word " * 400, "max_tokens": 4},  # longer than max_model_len
        {"prompt": "hi", "max_tokens": 4, "stream": True, "n": 2, "best_of": 3},
    ],
)
async def test_a_refused_request_gets_the_same_error(split, body):
    _, _, remote_url, local_url, _ = split
    async with httpx.AsyncClient(timeout=60) as client:
        got = await client.post(remote_url + "/v1/completions", json=body)
        want = await client.post(local_url + "/v1/completions", json=body)
    assert got.status_code == want.status_code and got.status_code in (400, 422)
    assert got.json() == want.json()


async def test_a_client_that_leaves_mid_stream_frees_its_blocks(split):
    engine, _, remote_url, _, _ = split
    async with httpx.AsyncClient(timeout=60) as client:
        body = {"prompt": "tell me a long story", "max_tokens": 200, "temperature": 0, "stream": True}
        async with client.stream("POST", remote_url + "/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
        assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total or await _settle(engine)
    assert await _settle(engine)


async def test_an_api_process_that_goes_away_ends_its_requests(split):
    """The engine's side ends every request of a connection that closes (a crashed API process)."""
    engine, _, _, _, path = split
    other = await RemoteEngine.connect(path)
    streams = [await other.submit("keep going", engine.default_params, request_id=f"gone-{i}") for i in range(3)]
    for s in streams:
        await s.__anext__()
    assert engine.stats().num_running + engine.stats().num_waiting == 3
    await other.close()
    assert await _settle(engine)


async def test_remote_streams_read_like_engine_streams(split):
    """``async for``, ``num_ready``, ``num_prompt_tokens``; leaving the loop early aborts the request; a duplicate
    request id is refused with the engine's own error."""
    engine, remote, _, _, _ = split
    params = engine.default_params
    stream = await remote.submit("count with me", params, request_id="r1")
    assert stream.num_prompt_tokens > 0
    toks = [t async for t in stream]
    assert toks[-1].finish_reason is not None and all(t.finish_reason is None for t in toks[:-1])
    want = await engine.generate("count with me", params)
    assert "".join(t.text for t in toks) == want.text
    long = await remote.submit("again", params, request_id="r2")
    async for _ in long:
        break
    await long.aclose()
    assert await _settle(engine)
    live = await remote.submit("one", params, request_id="dup")
    from acb.errors import DuplicateRequestIdError

    with pytest.raises(DuplicateRequestIdError):
        await remote.submit("two", params, request_id="dup")
    await live.aclose()
    assert await _settle(engine)


async def test_when_the_engine_closes_the_api_says_unavailable(split):
    engine, remote, remote_url, _, _ = split
    await engine.close()
    for _ in range(300):
        if not remote.running:
            break
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(timeout=30) as client:
        health = await client.get(remote_url + "/health")
        r = await client.post(remote_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert health.status_code == 503 and r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"


# -- the wire's edge cases (found by a review; each failed before its fix) ------------------------------------------


@contextlib.asynccontextmanager
async def _pair(make_model, tokenizer):
    """An engine, its host, and one remote connected to it (no HTTP)."""
    model, _ = make_model("llama", seed=83)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, max_model_len=256))
    private = tempfile.mkdtemp(prefix="acb-test-")
    try:
        async with engine:
            host = EngineHost(engine, os.path.join(private, "engine.sock"))
            await host.start()
            remote = await RemoteEngine.connect(host.path)
            try:
                yield engine, host, remote
            finally:
                await remote.close()
                await host.close()
    finally:
        shutil.rmtree(private, ignore_errors=True)


async def _until(predicate, seconds: float = 3.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_an_admission_cancelled_at_once_leaves_nothing_on_either_side(make_model, tokenizer):
    """Submit and abort reach the engine's side in one read: the abort cancels a task that never ran."""
    async with _pair(make_model, tokenizer) as (engine, host, remote):
        for i in range(5):
            t = asyncio.ensure_future(remote.submit("hello", engine.default_params, request_id=f"c{i}"))
            await asyncio.sleep(0)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        assert await _settle(engine)
        (peer,) = host._peers
        assert await _until(lambda: peer._tasks == {}), sorted(peer._tasks)
        assert remote._streams == {} and remote._admissions == {}


async def test_a_handler_cancelled_just_after_admission_leaves_no_stream(make_model, tokenizer, monkeypatch):
    """Cancelled after "admitted" resolved its wait but before it resumed: the request is aborted and its streams
    are not kept (nobody would ever read them)."""
    async with _pair(make_model, tokenizer) as (engine, _, remote):
        handler = {}
        receive = RemoteEngine._receive

        def cancel_on_admission(self, message):
            receive(self, message)
            if message[0] == "admitted" and message[1] in handler:
                handler.pop(message[1]).cancel()

        monkeypatch.setattr(RemoteEngine, "_receive", cancel_on_admission)
        t = handler["lost"] = asyncio.ensure_future(remote.submit("hello", engine.default_params, request_id="lost"))
        with pytest.raises(asyncio.CancelledError):
            await t
        assert await _settle(engine)
        assert remote._streams == {}


async def test_two_concurrent_submits_with_one_id_admit_one(make_model, tokenizer):
    from acb.errors import DuplicateRequestIdError

    async with _pair(make_model, tokenizer) as (engine, _, remote):
        a = asyncio.ensure_future(remote.submit("one", engine.default_params, request_id="dup"))
        b = asyncio.ensure_future(remote.submit("two", engine.default_params, request_id="dup"))
        done, pending = await asyncio.wait({a, b}, timeout=10)
        assert not pending, "a submit never returned"
        results = [t.exception() or t.result() for t in (a, b)]
        assert sum(isinstance(r, DuplicateRequestIdError) for r in results) == 1
        for r in results:
            if not isinstance(r, BaseException):
                await r.aclose()
        assert await _settle(engine)


async def test_when_the_engine_goes_a_finished_stream_stays_finished_and_calls_fail_fast(make_model, tokenizer):
    """The engine's side goes away (its process died): a stream whose last token had arrived still reads to its
    end; new submissions and chat renderings raise EngineClosedError at once (they used to wait for ever)."""
    from acb import SamplingParams
    from acb.errors import EngineClosedError

    async with _pair(make_model, tokenizer) as (_, host, remote):
        stream = await remote.submit("hello there", SamplingParams(max_new_tokens=4), request_id="fin")
        assert await _until(lambda: stream._items and stream._items[-1].finish_reason is not None, 5)
        await host.close()
        assert await _until(lambda: remote.state == "closed")
        toks = [t async for t in stream]
        assert toks[-1].finish_reason is not None
        with pytest.raises(EngineClosedError):
            await remote.submit("x", None, request_id="after")
        with pytest.raises(EngineClosedError):
            await asyncio.wait_for(remote.apply_chat_template([{"role": "user", "content": "hi"}]), 5)


async def test_the_api_side_follows_the_engines_state_promptly(make_model, tokenizer):
    """The engine starts closing: within 0.1 s the API side says so too (/health turns 503 as in-process)."""
    from acb import SamplingParams

    async with _pair(make_model, tokenizer) as (engine, _, remote):
        s = await engine.submit("keep going", SamplingParams(max_new_tokens=200, ignore_eos=True), request_id="k")
        closing = asyncio.ensure_future(engine.close(drain=True))
        await asyncio.sleep(0.15)
        try:
            assert engine.state != "running" and remote.state == engine.state
        finally:
            await s.aclose()
            await closing


async def test_an_api_process_that_stops_reading_is_dropped_and_its_requests_end(make_model, tokenizer, monkeypatch):
    """A peer that stops reading (a stopped process): once more than MAX_UNSENT_BYTES wait for it, the engine's side
    drops the connection and ends its requests, instead of buffering its tokens for ever."""
    from acb import SamplingParams
    from acb.serving import wire

    async with _pair(make_model, tokenizer) as (engine, host, remote):
        (peer,) = host._peers
        stream = await remote.submit("go on", SamplingParams(max_new_tokens=200, ignore_eos=True), request_id="s")
        await stream.__anext__()
        monkeypatch.setattr(wire, "MAX_UNSENT_BYTES", -1)  # as if the peer had stopped reading long ago
        assert await _until(lambda: not host._peers, 10), "the connection was not dropped"
        assert await _settle(engine)  # its request ended and freed its blocks
        assert peer.writer.is_closing()


async def test_a_burst_of_large_requests_is_refused_one_by_one_and_the_link_stays(make_model, tokenizer, monkeypatch):
    """More bytes of prompts and chats than MAX_UNSENT_BYTES at once (a dozen 8 MB bodies; the bound shrunk here):
    the API side holds its requests back until the engine has read what waits, instead of dropping its own link to
    the engine (which ended the whole API process, every client with it). Each request gets its own refusal, and
    the link then serves a normal request."""
    from acb import PromptTooLongError, SamplingParams
    from acb.serving import wire

    monkeypatch.setattr(wire, "MAX_UNSENT_BYTES", 1 << 20)
    async with _pair(make_model, tokenizer) as (engine, host, remote):
        big = "a" * (3 << 20)  # over the engine's max_prompt_chars; three times the bound
        results = await asyncio.gather(
            *(remote.submit(big, request_id=f"big{i}") for i in range(6)),
            *(remote.apply_chat_template([{"role": "user", "content": big}]) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, PromptTooLongError) for r in results), results
        assert not remote._reading.done() and host._peers
        stream = await remote.submit("hello", SamplingParams(max_new_tokens=3, ignore_eos=True), request_id="ok")
        assert len([t async for t in stream]) == 3


async def test_every_api_process_scrape_answers_the_http_counts_of_them_all(make_model, tokenizer):
    """With several API processes, a scrape answers the sum of every process's HTTP counters (a process that has
    gone keeps its last counts in it), whichever process the scrape reaches: not each process's own counts, which
    jumped from one scrape to the next."""
    from prometheus_client.parser import text_string_to_metric_families

    from acb.serving.metrics import ServerMetrics

    def values(text: str) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip

    from prometheus_client import generate_latest

    async with _pair(make_model, tokenizer) as (engine, host, first):
        second = await RemoteEngine.connect(host.path)
        metrics = [ServerMetrics(first), ServerMetrics(second)]
        for m, n in zip(metrics, (3, 5)):
            m.requests.labels("/v1/completions", "200").inc(n)
            m.generated_tokens.inc(10 * n)
            m.ttft.observe(0.02 * n)
        await asyncio.sleep(0.6)  # each process's counts go with the engine's state reports, twice a second
        scrapes = [values(generate_latest(await m.exported()).decode()) for m in metrics]
        assert scrapes[0] == scrapes[1]
        got = scrapes[0]
        assert got[("acb_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 8
        assert got[("acb_generated_tokens_total", ())] == 80
        assert got[("acb_time_to_first_token_seconds_count", ())] == 2
        assert got[("acb_kv_blocks_total", ())] == engine.stats().kv_blocks_total  # the engine's gauges too
        await second.close()  # its counts stay in the sum
        assert await _until(lambda: len(host._peers) == 1)
        metrics[0].generated_tokens.inc(1)
        assert values(generate_latest(await metrics[0].exported()).decode())[("acb_generated_tokens_total", ())] == 81
        assert metrics[0].registry is not None and values(generate_latest(metrics[0].registry).decode())[
            ("acb_generated_tokens_total", ())] == 31  # fmt: skip


async def test_a_scrape_answers_while_the_engine_drains_and_after_it_closed(make_model, tokenizer):
    """The summed counts come from the engine's process whatever the engine's state (they were a 500 from the
    moment it stopped running: all through a SIGTERM's drain); once that process is gone, a scrape answers with the
    API process's own counts."""
    from prometheus_client import generate_latest

    from acb.serving.metrics import ServerMetrics

    async with _pair(make_model, tokenizer) as (engine, host, remote):
        metrics = ServerMetrics(remote)
        metrics.generated_tokens.inc(7)
        await engine.close()
        assert await _until(lambda: remote.state == "closed")
        assert b"acb_generated_tokens_total 7.0" in generate_latest(await metrics.exported())
        await host.close()
        assert await _until(lambda: remote._reading.done())
        assert b"acb_generated_tokens_total 7.0" in generate_latest(await metrics.exported())
