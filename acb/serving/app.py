"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``,
``/metrics``.

Streaming responses are server-sent events. A client that disconnects aborts its requests: before the first token
(both kinds) and for plain responses, a watcher cancels the work when the connection drops; once a stream has
started, Starlette cancels the response generator, which closes the engine streams.

Request bodies are bounded (``max_body_bytes``, 8 MiB by default): a larger body is refused with 413 before it is
read, parsed or tokenized.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..engine import Engine
from ..errors import AcbError, EngineClosedError, InvalidRequestError, RequestFailedError
from ..outputs import Token
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, to_sampling_params

__all__ = ["create_app", "serve"]


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def _error_for(exc: Exception) -> JSONResponse:
    if isinstance(exc, InvalidRequestError):
        return _error(400, str(exc), "invalid_request_error", getattr(exc, "param", None))
    if isinstance(exc, EngineClosedError):
        return _error(503, str(exc), "service_unavailable")
    return _error(500, str(exc) or type(exc).__name__, "server_error")


DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class _BodyLimit:
    """ASGI middleware: read a request body up to ``max_bytes`` and hand it on; refuse a larger one with 413 as soon
    as its declared length or the bytes received say so, before anything parses it."""

    def __init__(self, app, max_bytes: int, on_refused) -> None:
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: the disconnect notice

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        self.on_refused(scope["path"])
        response = _error(
            413,
            f"the request body is larger than {self.max_bytes} bytes (acb serve --max-body-bytes)",
            "invalid_request_error",
            code="request_too_large",
        )
        response.headers["Connection"] = "close"
        await response(scope, None, send)


def create_app(
    engine: Engine,
    model_name: str | None = None,
    default_max_tokens: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """An ASGI app serving ``engine`` (which the caller starts and closes, e.g. around ``uvicorn``). Request bodies
    larger than ``max_body_bytes`` are refused with 413."""
    name = model_name or getattr(engine.model.config, "_name_or_path", None) or "acb-default"
    created = int(time.time())
    metrics = ServerMetrics(engine)
    app = FastAPI(title="acb", summary="OpenAI-compatible API over an acb engine")
    app.state.engine = engine
    app.state.metrics = metrics
    known = ("/v1/completions", "/v1/chat/completions")  # metric labels never take a client's arbitrary path
    app.add_middleware(
        _BodyLimit,
        max_bytes=max_body_bytes,
        on_refused=lambda path: metrics.requests.labels(path if path in known else "other", "413").inc(),
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{loc or 'body'}: {first.get('msg', 'invalid request')}"
        return _counted(request.url.path, _error(400, message, "invalid_request_error", loc))

    @app.get("/health")
    async def health():
        ok = engine._state == "running"
        return JSONResponse({"status": "ok" if ok else engine._state}, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "acb"}]}

    def _check_model(req) -> JSONResponse | None:
        if req.model not in (None, name):
            return _error(
                404,
                f"The model '{req.model}' does not exist; this server serves '{name}'",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return None

    def _counted(endpoint: str, response: Response) -> Response:
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        endpoint = "/v1/completions"
        if (bad := _check_model(req)) is not None:
            return _counted(endpoint, bad)
        return await _respond(request, endpoint, req, _prompts(req.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        endpoint = "/v1/chat/completions"
        if (bad := _check_model(req)) is not None:
            return _counted(endpoint, bad)
        try:
            prompt = await engine.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages])
        except AcbError as exc:
            return _counted(endpoint, _error_for(exc))
        return await _respond(request, endpoint, req, [prompt], chat=True)

    async def _respond(request: Request, endpoint: str, req, prompts: list, chat: bool):
        try:
            params = to_sampling_params(req, engine.default_sampling, default_max_tokens)
        except AcbError as exc:
            return _counted(endpoint, _error_for(exc))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        arrival = time.perf_counter()
        streams = [engine.stream(p, params, request_id=f"{rid}-{i}") for i, p in enumerate(prompts)]
        # Pull the first item of every stream now: admission errors become a proper HTTP error, not a broken stream.
        # A client that leaves before its first token aborts its requests here (they may still be queued).
        try:
            firsts = await _until_disconnect(
                request, asyncio.gather(*(_first(s) for s in streams), return_exceptions=True)
            )
        except _Disconnected:
            for s in streams:
                await s.aclose()
            return _counted(endpoint, Response(status_code=499))  # the client went away; nobody reads this
        if errors := [f for f in firsts if isinstance(f, BaseException)]:
            for s in streams:
                await s.aclose()
            if not isinstance(errors[0], Exception):
                raise errors[0]  # cancellation and the like
            return _counted(endpoint, _error_for(errors[0]))
        metrics.ttft.observe(time.perf_counter() - arrival)
        for s in streams:
            metrics.prompt_tokens.inc(s.num_prompt_tokens)
        if req.stream:
            metrics.requests.labels(endpoint, "200").inc()
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            body = _sse(rid, name, streams, firsts, chat, include_usage, metrics)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await _until_disconnect(
                request, asyncio.gather(*(_collect(s, f) for s, f in zip(streams, firsts)))
            )
        except _Disconnected:
            for s in streams:
                await s.aclose()
            return _counted(endpoint, Response(status_code=499))
        except RequestFailedError as exc:
            return _counted(endpoint, _error_for(exc))
        completion_tokens = sum(len(r["ids"]) for r in results)
        metrics.generated_tokens.inc(completion_tokens)
        prompt_tokens = sum(s.num_prompt_tokens for s in streams)
        metrics.requests.labels(endpoint, "200").inc()
        choices = []
        for i, r in enumerate(results):
            if chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": r["text"]},
                        "logprobs": _chat_logprobs(r) if req.logprobs else None,
                        "finish_reason": r["finish_reason"],
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": r["text"],
                        "logprobs": _completion_logprobs(r) if req.logprobs is not None else None,
                        "finish_reason": r["finish_reason"],
                    }
                )
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return app


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], list):
        return list(prompt)
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt) if prompt else [""]


async def _first(stream) -> Token:
    return await stream.__anext__()


async def _collect(stream, first: Token) -> dict[str, Any]:
    toks = [first]
    if first.finish_reason is None:
        async for tok in stream:
            toks.append(tok)
    return {
        "text": "".join(t.text for t in toks),
        "ids": [t.id for t in toks if t.id is not None],
        "tokens": toks,
        "finish_reason": _openai_reason(toks[-1].finish_reason),
    }


def _openai_reason(reason: str | None) -> str | None:
    return {"abort": "abort"}.get(reason, reason)


def _chat_logprobs(r: dict) -> dict:
    return {
        "content": [
            {"token": t.text, "logprob": t.logprob, "top_logprobs": []} for t in r["tokens"] if t.id is not None
        ]
    }


def _completion_logprobs(r: dict) -> dict:
    toks = [t for t in r["tokens"] if t.id is not None]
    return {
        "tokens": [t.text for t in toks],
        "token_logprobs": [t.logprob for t in toks],
        "top_logprobs": None,
        "text_offset": [],
    }


class _Disconnected(Exception):
    """The client closed the connection before its response was ready."""


async def _until_disconnect(request: Request, work: Awaitable):
    """Await ``work``; cancel it and raise :class:`_Disconnected` if the client goes away first.

    The watcher waits on the connection's next ASGI message, which after the request body is the disconnect notice:
    no polling."""
    work = asyncio.ensure_future(work)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (server shutdown)
        work.cancel()
        watcher.cancel()
        raise
    loser = watcher if work in done else work
    loser.cancel()
    await asyncio.gather(loser, return_exceptions=True)
    if work in done:
        return work.result()
    raise _Disconnected


async def _sse(rid, model, streams, firsts, chat, include_usage, metrics) -> AsyncIterator[str]:
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    queue: asyncio.Queue = asyncio.Queue()
    counts = [0] * len(streams)

    async def pump(i, stream, first):
        try:
            await queue.put((i, first))
            if first.finish_reason is None:
                async for tok in stream:
                    await queue.put((i, tok))
        except Exception as exc:
            await queue.put((i, exc))

    def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            )
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    pumps = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
    try:
        if chat:
            for i in range(len(streams)):
                yield chunk(i, None, None, role=True)
        open_ = len(streams)
        while open_:
            i, item = await queue.get()
            if isinstance(item, Exception):
                open_ -= 1
                err = {"error": {"message": str(item), "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                continue
            if item.id is not None:
                counts[i] += 1
                metrics.generated_tokens.inc()
            if item.text or item.finish_reason:
                yield chunk(i, item.text, _openai_reason(item.finish_reason))
            if item.finish_reason is not None:
                open_ -= 1
        if include_usage:
            prompt_tokens = sum(s.num_prompt_tokens for s in streams)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": sum(counts),
                "total_tokens": prompt_tokens + sum(counts),
            }
            tail = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also on client disconnect: Starlette cancels this generator, and every stream is aborted
        for p in pumps:
            p.cancel()
        for s in streams:
            await s.aclose()


async def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    log_level: str = "info",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Run the API under uvicorn on the running loop until cancelled or signalled; the engine must be started.

    On SIGTERM or SIGINT the server stops accepting connections and closes the engine at once, so open requests get
    ``drain_timeout`` to finish (then end with an error): shutdown takes at most about ``drain_timeout``."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            closing = asyncio.ensure_future(engine.close(drain=True))
            try:
                await super().shutdown(sockets)
            finally:
                await closing

    config = uvicorn.Config(
        create_app(engine, model_name, max_body_bytes=max_body_bytes),
        host=host,
        port=port,
        log_level=log_level,
        loop="none",
        lifespan="off",
        timeout_graceful_shutdown=engine.config.drain_timeout + 1.0,
    )
    await _Server(config).serve()
