"""The server's edges found by a review: errors that quote a client's text, the engine closing under a plain
request, one failed sample of several, usage with n > 1, tokens delivered just before an error with
``stream_interval`` > 1, strict types, error params, ``text_offset``, a client leaving while its prompts are
admitted, and the cap on choices per request."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
import uvicorn

from acb import Engine, EngineConfig, RequestFailedError, SamplingParams
from acb.serving import create_app
from acb.serving.app import MAX_CHOICES

pytestmark = pytest.mark.loops("asyncio")


@contextlib.asynccontextmanager
async def serving(engine, **kw):
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", **kw), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))  # fmt: skip
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def client(engine, **kw):
    async with engine:
        app = create_app(engine, "tiny", **kw)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as http:
            yield http


def fail_mid_way(engine, suffix: str, after: int, record: list | None = None):
    """Every step holding a request whose id ends with ``suffix`` and that has ``after`` output tokens fails.
    ``record`` gets, per failure, the output tokens such a request had then (what the engine accepted for it)."""
    build = engine._builder.build

    def fragile(step):
        failing = [s for s in step.seqs if s.request_id.endswith(suffix) and s.num_output >= after]
        if failing:
            if record is not None:
                record.append(list(failing[0].output_ids))
            raise OverflowError("boom")
        return build(step)

    engine._builder.build = fragile


async def settle(engine):
    for _ in range(300):
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total:
            return
        await asyncio.sleep(0.01)


async def test_a_lone_surrogate_quoted_in_an_error_still_gets_a_json_error(make_model, tokenizer):
    model, _ = make_model("llama", seed=1)
    async with client(Engine(model, tokenizer)) as http:
        r = await http.post(
            "/v1/completions",
            content=b'{"model": "\\ud800", "prompt": "x", "max_tokens": 2}',
            headers={"content-type": "application/json"},
        )
        assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text)
        assert r.status_code in (400, 404)


async def test_the_engine_closing_during_a_plain_request_gets_a_json_503(make_model, tokenizer):
    model, _ = make_model("llama", seed=2)
    engine = Engine(model, tokenizer, EngineConfig(drain_timeout=0.0))
    async with client(engine) as http:
        body = {"prompt": "x", "max_tokens": 1900, "ignore_eos": True}
        req = asyncio.create_task(http.post("/v1/completions", json=body))
        while engine.stats().num_running == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        await engine.close()
        r = await req
        assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text)
        assert r.status_code == 503


@pytest.mark.parametrize("body, suffix", [({"prompt": "x", "n": 2}, "-0-0"), ({"prompt": ["x", "y"]}, "-0")])
async def test_a_failed_sample_of_a_plain_request_ends_its_siblings(make_model, tokenizer, body, suffix):
    model, _ = make_model("llama", seed=3)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    async with client(engine) as http:
        fail_mid_way(engine, suffix, 3)
        r = await http.post("/v1/completions", json={**body, "max_tokens": 1900, "ignore_eos": True, "temperature": 1})
        assert r.status_code == 500 and "boom" in r.text
        await asyncio.sleep(0.3)
        s = engine.stats()
        assert s.num_running == 0, f"{s.num_running} sibling(s) still generating after the request got its 500"


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_counts_each_prompt_once_whatever_n(make_model, tokenizer, stream):
    model, _ = make_model("llama", seed=4)
    async with client(Engine(model, tokenizer)) as http:
        one = (await http.post("/v1/completions", json={"prompt": "Tell me", "max_tokens": 2})).json()
        body = {
            "prompt": "Tell me",
            "max_tokens": 2,
            "n": 3,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
        r = await http.post("/v1/completions", json=body)
        if stream:
            usage = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")][-1]["usage"]
        else:
            usage = r.json()["usage"]
        assert usage["prompt_tokens"] == one["usage"]["prompt_tokens"], (usage, one["usage"])


async def test_tokens_delivered_before_a_mid_stream_error_are_written(make_model, tokenizer):
    """Every token the engine generated before a step failed the request is written before the error event, also
    when ``stream_interval`` > 1 reads several tokens at once. (How many tokens that is depends on how far the
    overlapped pipeline got when the failure came, so each response is checked against what the engine had
    accepted when it failed the request, not against the other.)"""
    model, _ = make_model("llama", seed=5)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    accepted: list[list[int]] = []
    async with engine:
        fail_mid_way(engine, "-0", 5, accepted)
        for interval in (1, 8):
            accepted.clear()
            app = create_app(engine, "tiny", stream_interval=interval)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
                r = await http.post(
                    "/v1/completions",
                    json={"prompt": [5, 6, 7], "max_tokens": 50, "ignore_eos": True, "stream": True, "temperature": 0},
                )
            events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
            assert any("error" in e for e in events)
            text = "".join(c["text"] for e in events for c in e.get("choices", []))
            assert accepted and len(accepted[0]) >= 5
            assert text == tokenizer.decode(accepted[0]), (interval, text, accepted[0])


@pytest.mark.parametrize("decode_steps", [1, 4])
async def test_a_failed_request_gets_every_token_accepted_before_its_error(make_model, tokenizer, decode_steps):
    """A step fails a request while the tokens the engine accepted for it in earlier steps still wait for the
    delivery stage (with overlap, the step loop prepares the next step before those are detokenized; a multi-step
    round accepts several at once): they reach the stream, then the error. The failure is injected exactly then, so
    this does not depend on timing."""
    model, _ = make_model("llama", seed=5)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, decode_steps=decode_steps))
    accepted: list[list[int]] = []
    async with engine:
        build = engine._builder.build

        def fragile(step):
            for s in step.seqs:
                if s.request_id == "r" and (accepted or (s.num_output >= 5 and engine._to_detok.qsize())):
                    accepted.append(list(s.output_ids))
                    raise OverflowError("boom")
            return build(step)

        engine._builder.build = fragile
        ids = []
        with pytest.raises(RequestFailedError, match="boom"):
            async for tok in engine.stream(
                [5, 6, 7], SamplingParams(max_new_tokens=50, ignore_eos=True), request_id="r"
            ):
                ids.append(tok.id)
        await settle(engine)
    assert accepted, "the failure was never injected while tokens waited for delivery"
    assert ids == accepted[0], f"the stream got {ids}; the engine had accepted {accepted[0]} when it failed"


@pytest.mark.parametrize("extra", [{"max_tokens": True}, {"n": True}, {"prompt": [True, 5]}, {"max_tokens": "3"}])
async def test_booleans_and_strings_are_not_taken_for_integers(make_model, tokenizer, extra):
    model, _ = make_model("llama", seed=6)
    async with client(Engine(model, tokenizer)) as http:
        r = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra})
        assert r.status_code == 400, r.text


async def test_unsupported_top_logprobs_names_itself(make_model, tokenizer):
    model, _ = make_model("llama", seed=7)
    async with client(Engine(model, tokenizer)) as http:
        r = await http.post("/v1/completions", json={"prompt": "x", "top_logprobs": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text


async def test_text_offset_is_where_each_token_starts(make_model, tokenizer):
    """Plain and streamed: one offset per token, each where the token's text starts in the choice's text."""
    model, _ = make_model("llama", seed=8)
    body = {"prompt": "x", "max_tokens": 6, "logprobs": 0, "ignore_eos": True, "temperature": 0}
    async with client(Engine(model, tokenizer)) as http:
        lp = (await http.post("/v1/completions", json=body)).json()["choices"][0]["logprobs"]
        r = await http.post("/v1/completions", json={**body, "stream": True})
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:k])) for k in range(len(lp["tokens"]))], lp
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    streamed = [off for e in events for c in e["choices"] if c["logprobs"] for off in c["logprobs"]["text_offset"]]
    assert streamed == lp["text_offset"]


async def test_a_wrong_type_in_a_union_field_names_the_field(make_model, tokenizer):
    model, _ = make_model("llama", seed=9)
    async with client(Engine(model, tokenizer)) as http:
        r = await http.post("/v1/completions", json={"prompt": "x", "stop": [1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text


async def test_a_client_leaving_while_its_prompts_are_admitted_frees_them(make_model, tokenizer):
    """A multi-prompt request whose prompts wait for room in the admission queue: the client leaves, yet the
    handler keeps submitting (nothing watches the connection during admission), and the engine keeps running them."""
    model, _ = make_model("llama", seed=21)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, max_num_seqs=2, max_pending=2))
    async with engine, serving(engine) as url:
        body = {"prompt": [f"p{i}" for i in range(40)], "max_tokens": 300, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=url, timeout=0.5) as quitter:
            with pytest.raises(httpx.ReadTimeout):
                await quitter.post("/v1/completions", json=body)
        await asyncio.sleep(3.0)
        s = engine.stats()
        assert s.num_running == 0 and s.num_waiting == 0, f"the client left 3 s ago; the engine still runs: {s}"


@pytest.mark.parametrize("body", [{"prompt": ["p"] * (MAX_CHOICES + 1)}, {"prompt": ["p", "q", "r"], "n": 64}])
async def test_a_request_asking_for_too_many_choices_is_refused(make_model, tokenizer, body):
    model, _ = make_model("llama", seed=10)
    engine = Engine(model, tokenizer)
    async with client(engine) as http:
        r = await http.post("/v1/completions", json={**body, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert engine.stats().num_running + engine.stats().num_waiting == 0


@pytest.mark.parametrize(
    "content", [[{"type": "image_url", "image_url": {"url": "http://x"}}], [{"foo": 1}], [{"type": "text", "text": 5}]]
)
async def test_chat_content_parts_other_than_text_are_refused(make_model, tokenizer, content):
    """An image part would be dropped by the chat template and the model would answer without it: refused, naming
    the message's content."""
    model, _ = make_model("llama", seed=11)
    async with client(Engine(model, tokenizer)) as http:
        ok = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}]}], "max_tokens": 2})  # fmt: skip
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert ok.status_code == 200, ok.text
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text


async def test_chat_text_parts_reach_the_template_as_the_plain_string(make_model, tokenizer):
    """Text parts are joined (by newlines) into the string the template renders: the same prompt, token for token,
    as the message written as one string, never the list's Python repr."""
    model, _ = make_model("llama", seed=11)
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    body = {"max_tokens": 2, "ignore_eos": True}
    async with client(Engine(model, tokenizer)) as http:
        chat = [{"role": "user", "content": parts}]
        as_parts = await http.post("/v1/chat/completions", json={"messages": chat, **body})
        chat = [{"role": "user", "content": "hello\nthere"}]
        as_text = await http.post("/v1/chat/completions", json={"messages": chat, **body})
    assert as_parts.status_code == as_text.status_code == 200, as_parts.text
    assert as_parts.json()["usage"]["prompt_tokens"] == as_text.json()["usage"]["prompt_tokens"]
    assert as_parts.json()["choices"][0]["message"] == as_text.json()["choices"][0]["message"]
