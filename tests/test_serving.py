"""The OpenAI-compatible server, driven by the official openai client and by raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
import uvicorn
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from acb import Engine, EngineConfig, SamplingParams
from acb.serving import create_app


@pytest.fixture
async def served(make_model, tokenizer):
    model, ref = make_model("llama", seed=81)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    async with engine:
        server = uvicorn.Server(
            uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield engine, f"http://127.0.0.1:{port}"
        server.should_exit = True
        await task


async def _settle(engine: Engine) -> None:
    for _ in range(200):
        s = engine.stats()
        if s.kv_blocks_free == s.kv_blocks_total and s.num_running == 0:
            return
        await asyncio.sleep(0.01)


async def test_openai_client_chat_streaming_and_plain(served, tokenizer):
    engine, url = served
    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]

    messages = [{"role": "user", "content": "Say hello"}]
    stream = await client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    plain = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    prompt = await engine.apply_chat_template(messages)
    direct = await engine.generate(prompt, SamplingParams(max_new_tokens=12))
    assert "".join(parts) == plain.choices[0].message.content == direct.text
    assert finish == plain.choices[0].finish_reason == direct.finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens == len(direct.token_ids)
    assert plain.usage.prompt_tokens == len(direct.prompt_token_ids)
    await client.close()


async def test_openai_client_completions(served):
    engine, url = served
    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    direct = await engine.generate("The capital", SamplingParams(max_new_tokens=6, ignore_eos=True))
    out = await client.completions.create(
        model="tiny", prompt="The capital", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == direct.text and out.choices[0].finish_reason == "length"
    streamed = await client.completions.create(
        model="tiny",
        prompt=["The capital", "The capital"],
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    texts = ["", ""]
    async for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [direct.text, direct.text]
    with pytest.raises(NotFoundError):
        await client.completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(BadRequestError):
        await client.completions.create(model="tiny", prompt="x", max_tokens=0)
    await client.close()


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 2}, "top_p"),
        ("/v1/completions", {"prompt": "", "max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": [1, 99999999]}, "prompt"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "n": 65}, "n"),
        ("/v1/completions", {"prompt": "x", "best_of": 3, "n": 4}, "best_of"),
        ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": -9}, "frequency_penalty"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "regex": "(unclosed"}, "regex"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        # OpenAI's names, not acb's: max_tokens, max_completion_tokens
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
         "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "yaml"}}, "response_format"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/none"}}}}, "response_format"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
         "top_logprobs"),
        # fields acb does not implement are refused, never ignored
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
        ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"continuous_usage": True}},
         "stream_options"),
        ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "false"}},
         "stream_options"),  # a string is not a bool (it read as true)
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),  # no stream
        # values past what acb stores: a 400 for the request, never a 500 that fails the others' steps
        ("/v1/completions", {"prompt": "x", "max_tokens": 2**63, "min_tokens": 2**63}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"9" * 5000: 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"²": 1}}, "logit_bias"),
    ],
)  # fmt: skip
async def test_invalid_requests_get_openai_style_400s(served, path, body, param):
    engine, url = served
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post(path, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
        bad_json = await http.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
        ok = await http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
        assert ok.status_code == 200


async def test_health_and_metrics(served):
    engine, url = served
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        text = (await http.get("/metrics")).text
    assert 'acb_http_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert "acb_generated_tokens_total 3.0" in text
    assert "acb_time_to_first_token_seconds_count 1.0" in text
    for gauge in ("acb_requests_waiting", "acb_requests_running", "acb_kv_usage_ratio", "acb_kv_blocks_free"):
        assert gauge in text


async def test_client_disconnect_mid_stream_frees_the_request(served):
    engine, url = served
    body = {"prompt": "a long story", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url) as http:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            while not (await lines.__anext__()).startswith("data: {"):
                pass
            assert engine.stats().num_running == 1
            assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total
        # leaving the block closes the connection mid-stream
        await _settle(engine)
        s = engine.stats()
        assert s.num_running == 0 and s.kv_blocks_free == s.kv_blocks_total
        metrics = (await http.get("/metrics")).text
    assert f"acb_kv_blocks_free {float(s.kv_blocks_total)}" in metrics


async def test_client_disconnect_on_a_plain_request_frees_it(served):
    engine, url = served
    body = {"prompt": "a long story", "max_tokens": 1900, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=body)
    await _settle(engine)
    s = engine.stats()
    assert s.num_running == 0 and s.kv_blocks_free == s.kv_blocks_total
    async with httpx.AsyncClient(base_url=url) as http:
        metrics = (await http.get("/metrics")).text
    assert 'acb_http_requests_total{endpoint="/v1/completions",status="499"} 1.0' in metrics  # aborted, not finished


async def test_streamed_sse_format(served):
    engine, url = served
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True},
        )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


async def test_malformed_bodies_get_the_same_error_shape(served):
    engine, url = served
    async with httpx.AsyncClient(base_url=url) as http:
        for body in (b'{"prompt": "x", "max_tokens": 2', b'\xff\xfe{"prompt": "x"}', b"[1, 2]"):
            r = await http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"]
            assert err["param"] in (None, "body")
        r = await http.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 2', headers={"content-type":
                            "application/json"})  # fmt: skip
        assert "not valid JSON" in r.json()["error"]["message"]
        r = await http.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.get("/v1/models/some-other-model")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert (await http.get("/v1/models/tiny")).json()["id"] == "tiny"


async def test_streamed_chunks_carry_logprobs(served):
    engine, url = served
    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    body = dict(model="tiny", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    plain = await client.completions.create(prompt="abc", logprobs=0, **body)
    stream = await client.completions.create(prompt="abc", logprobs=0, stream=True, **body)
    streamed = [lp for c in [c async for c in stream] for ch in c.choices if ch.logprobs
                for lp in ch.logprobs.token_logprobs]  # fmt: skip
    assert streamed == pytest.approx(plain.choices[0].logprobs.token_logprobs) and len(streamed) == 5
    chat = await client.chat.completions.create(
        messages=[{"role": "user", "content": "abc"}], logprobs=True, stream=True, **body
    )
    chat_lps = [
        x.logprob for c in [c async for c in chat] for ch in c.choices if ch.logprobs for x in ch.logprobs.content
    ]
    assert len(chat_lps) == 5 and all(lp <= 0 for lp in chat_lps)
    await client.close()


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "rank": {"type": "integer", "minimum": 1,
                                                                          "maximum": 9}},
    "required": ["city", "rank"],
    "additionalProperties": False,
}  # fmt: skip


async def test_openai_client_structured_output_streaming_and_plain(served):
    import jsonschema

    engine, url = served
    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "A city as JSON"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    plain = await client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=200, temperature=0.8, seed=4, response_format=fmt
    )
    stream = await client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=200, temperature=0.8, seed=4, response_format=fmt, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == plain.choices[0].message.content
    jsonschema.validate(json.loads(streamed), SCHEMA)
    obj = await client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=400, response_format={"type": "json_object"}
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = await client.completions.create(
        model="tiny", prompt="code:", max_tokens=30, extra_body={"regex": "[A-Z]{3}-[0-9]{4}"}
    )
    assert re.fullmatch("[A-Z]{3}-[0-9]{4}", regex.choices[0].text)
    await client.close()


async def test_openai_client_penalties_bias_and_top_logprobs_match_the_engine(served):
    engine, url = served
    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    direct = await engine.generate("Once", SamplingParams(
        max_new_tokens=10, ignore_eos=True, presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.3,
        logit_bias={17: 3.0}, top_logprobs=3))  # fmt: skip
    out = await client.completions.create(
        model="tiny", prompt="Once", max_tokens=10, temperature=0, presence_penalty=0.8, frequency_penalty=0.4,
        logit_bias={"17": 3.0}, logprobs=3, extra_body={"ignore_eos": True, "repetition_penalty": 1.3},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.text == direct.text
    assert choice.logprobs.token_logprobs == pytest.approx(direct.logprobs, abs=1e-5)
    assert [len(t) for t in choice.logprobs.top_logprobs] == [3] * 10 or all(
        len(t) <= 3 for t in choice.logprobs.top_logprobs
    )  # two alternatives may decode to the same text
    messages = [{"role": "user", "content": "hi"}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    plain = await client.chat.completions.create(**kwargs)
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [len(t.top_logprobs) for t in plain.choices[0].logprobs.content] == [2] * len(streamed)
    assert [t.top_logprobs[0].logprob for t in streamed] == pytest.approx(
        [t.top_logprobs[0].logprob for t in plain.choices[0].logprobs.content], abs=1e-5
    )
    for t in plain.choices[0].logprobs.content:
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)  # greedy: the most likely
    await client.close()


async def test_openai_client_n_and_best_of(served):
    engine, url = served
    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11, n=3, ignore_eos=True)
    direct = await engine.generate_choices("Tell", params)
    kwargs = dict(model="tiny", prompt="Tell", max_tokens=8, temperature=1.0, seed=11, n=3,
                  extra_body={"ignore_eos": True})  # fmt: skip
    plain = await client.completions.create(**kwargs)
    assert [c.index for c in plain.choices] == [0, 1, 2]
    assert [c.text for c in plain.choices] == [c.text for c in direct]
    texts = ["", "", ""]
    async for chunk in await client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in direct]
    chat = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, n=2, temperature=1.0, seed=2
    )
    assert [c.index for c in chat.choices] == [0, 1]
    best = await engine.generate_choices("Tell", SamplingParams(
        max_new_tokens=8, temperature=1.0, seed=11, n=1, best_of=3, ignore_eos=True))  # fmt: skip
    out = await client.completions.create(**{**kwargs, "n": 1}, best_of=3)
    assert [c.text for c in out.choices] == [best[0].text]
    assert out.usage.completion_tokens == 24  # every sample counts
    await client.close()


class _Stream:
    """A RequestStream stand-in for the SSE writer: ``batches`` of tokens, each batch delivered at once (what
    ``num_ready`` reports), a step of the loop between batches; ``fail`` raises after the last batch."""

    def __init__(self, batches, fail=None):
        self._items = [t for b in batches for t in b]
        self._ends = set()
        n = 0
        for b in batches:
            n += len(b)
            self._ends.add(n)  # a batch ends here: the reader must suspend
        self._i, self._fail, self.num_prompt_tokens, self.closed = 0, fail, 3, False

    @property
    def num_ready(self):
        return 0 if self._i in self._ends or self._i >= len(self._items) else 1

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._i in self._ends:
            await asyncio.sleep(0)
        if self._i >= len(self._items):
            if self._fail:
                raise self._fail
            raise StopAsyncIteration
        self._i += 1
        return self._items[self._i - 1]

    async def aclose(self):
        self.closed = True


def _server():
    from prometheus_client import CollectorRegistry, Counter

    from acb.serving.app import _Server

    metrics = type("M", (), {})()
    metrics.generated_tokens = Counter("g", "generated", registry=CollectorRegistry())
    return _Server(engine=None, name='m "quoted" ü', created=0, metrics=metrics)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_sse_chunks_are_the_models_dumps_and_arrive_batched(chat):
    """The SSE writer's fast path (a template around each token's text) writes exactly what the response models
    dump, for texts that JSON must escape; tokens waiting together go out in one write; the usage chunk counts
    every token; several streams are merged, and a stream that fails mid-way sends an error event."""
    from acb.outputs import Token
    from acb.serving.bodies import sse
    from acb.serving.protocol import ChatCompletionChunk, CompletionChunk

    texts = ['a"b', "\\n", "ü\n", "\x01", "</script>", "\u2028", "", " end"]
    toks = [Token(i + 1, t) for i, t in enumerate(texts[:-1])] + [Token(9, texts[-1], finish_reason="length")]
    server = _server()
    writes = [w async for w in sse(server, "cmpl-1", [_Stream([toks[1:4], toks[4:6], toks[6:]])], [toks[0]], chat,
                                   True, False)]  # fmt: skip
    events = [json.loads(e[6:]) for w in writes for e in w.split("\n\n") if e.startswith("data: {")]
    model = ChatCompletionChunk if chat else CompletionChunk
    if chat:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        events = events[1:]
    got = [e for e in events if e["choices"]]
    want = []
    for t in toks:
        if not t.text and not t.finish_reason:
            continue  # nothing to say for an empty token
        choice = ({"index": 0, "delta": {"content": t.text or None}, "finish_reason": t.finish_reason} if chat else
                  {"index": 0, "text": t.text, "finish_reason": t.finish_reason})  # fmt: skip
        d = model(id="cmpl-1", created=got[0]["created"], model=server.name, choices=[choice]).model_dump()
        if chat:
            d["choices"][0]["delta"] = {k: v for k, v in d["choices"][0]["delta"].items() if v is not None}
        want.append(d)
    assert got == want
    assert events[-1]["usage"]["completion_tokens"] == len(toks) == server.metrics.generated_tokens._value.get()
    assert writes[-1] == "data: [DONE]\n\n" and len(writes) < len(toks)  # batched: fewer writes than tokens
    # two streams merged; the second fails after its first token
    a, b = _Stream([toks[1:3], toks[3:]]), _Stream([[toks[1]]], fail=RuntimeError("boom"))
    out = "".join([w async for w in sse(_server(), "cmpl-2", [a, b], [toks[0], toks[0]], chat, False, False)])
    events = [json.loads(e[6:]) for e in out.split("\n\n") if e.startswith("data: {")]
    assert [e["error"]["message"] for e in events if "error" in e] == ["boom"]
    assert {e["choices"][0]["index"] for e in events if e.get("choices")} == {0, 1} and a.closed and b.closed


async def test_a_stream_interval_groups_tokens_per_write_and_changes_no_token(make_model, tokenizer, monkeypatch):
    """``create_app(stream_interval=4)``: a streamed response's engine stream wakes its writer every 4 tokens (a
    plain response's only for its first token and its end), the writes carry several events each, and the tokens
    are those of ``stream_interval=1`` and of the engine itself."""
    model, _ = make_model("llama", seed=82)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    intervals = []
    submit = Engine.submit

    async def spy(self, prompt, params=None, **kw):
        intervals.append(kw.get("stream_interval"))
        return await submit(self, prompt, params, **kw)

    monkeypatch.setattr(Engine, "submit", spy)
    with pytest.raises(ValueError, match="stream_interval"):
        create_app(engine, "tiny", stream_interval=0)
    for body_limit in (0, -1, 1.5, True):  # every POST would get 413 (0 became 8 MiB in an API process)
        with pytest.raises(ValueError, match="max_body_bytes must be an integer >= 1"):
            create_app(engine, "tiny", max_body_bytes=body_limit)
    body = {"prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    async with engine:
        want = (await engine.generate([5, 6, 7], SamplingParams(max_new_tokens=9, ignore_eos=True))).text
        texts, writes = {}, {}
        for interval in (1, 4):
            app = create_app(engine, "tiny", stream_interval=interval)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
            task = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            intervals.clear()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    raw = [part async for part in r.aiter_raw()]
                plain = (await http.post("/v1/completions", json=body)).json()
            server.should_exit = True
            await task
            events = [json.loads(e[6:]) for e in b"".join(raw).decode().split("\n\n") if e.startswith("data: {")]
            texts[interval] = "".join(c["text"] for e in events for c in e["choices"])
            writes[interval] = sum(part.count(b"data: {") > 1 for part in raw)  # writes that carried several events
            assert plain["choices"][0]["text"] == want
            assert intervals[0] == interval and intervals[1] > 1000  # the streamed request, then the plain one
    assert texts[1] == texts[4] == want
    assert writes[4] >= 1
