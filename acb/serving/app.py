"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` (and
``/v1/models/{id}``), ``/health``, ``/metrics``.

Requests are submitted with :meth:`acb.Engine.submit`, so a bad one gets its 400 before any response starts, also
for streams. Streaming responses are server-sent events (the bodies' shapes: :mod:`acb.serving.bodies`). A client
that disconnects aborts its requests: before the first token (both kinds) and for plain responses, a watcher
cancels the work when the connection drops; once a stream has started, Starlette cancels the response generator,
which closes the engine streams.

Request bodies are bounded (``max_body_bytes``, 8 MiB by default): a larger body is refused with 413 before it is
read, parsed or tokenized. With ``api_key``, every ``/v1`` request needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..errors import AcbError, EngineClosedError, InvalidRequestError
from ..stream import RequestStream
from .bodies import chat_logprobs, collect, completion_logprobs, cumulative_logprob, sse
from .metrics import ServerMetrics
from .middleware import DEFAULT_MAX_BODY_BYTES, ApiKey, BodyLimit, error_response
from .protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UnsupportedFieldError,
    Usage,
    openai_param,
    to_sampling_params,
)

__all__ = ["create_app", "serve", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_TIMEOUT_KEEP_ALIVE_S", "MAX_CHOICES"]

DEFAULT_TIMEOUT_KEEP_ALIVE_S = 75.0
"""Seconds an idle HTTP/1.1 connection stays open (uvicorn's ``timeout_keep_alive``; uvicorn's own default is 5).
Longer than the idle expiry of common clients (httpx, so the openai client: 5 s; aiohttp: 15 s) and load balancers'
idle timeouts (often 60 s): the client, which knows when it will reuse a connection, lets it go first. At equal
times, the server closes a connection just as the client sends a new request on it, and the client gets a reset
(httpx: ``ReadError``) that it does not retry for a POST."""

_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")  # metric labels never take a client's arbitrary path
MAX_CHOICES = 128
"""Most choices (prompts x samples) one request may ask for: a single small body cannot fill the engine's queue."""
_UNION_BRANCH = re.compile(r"str|int|float|bool|none|(list|dict)\[.*\]")  # in pydantic's error locations
_WHOLE = 1 << 30  # a stream_interval no response reaches: the reader wakes for the first token and the end


@dataclass
class _Server:
    """What every handler needs, kept on ``app.state.acb``."""

    engine: Engine
    name: str
    created: int
    metrics: ServerMetrics
    stream_interval: int = 1
    _texts: dict[int, str] = dataclasses.field(default_factory=dict)

    def count(self, endpoint: str, response: Response) -> Response:
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for top-logprob alternatives), decoded once per id."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.engine.tokenizer.decode([token_id])
        return text


def create_app(
    engine: Engine,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
    stream_interval: int = 1,
) -> FastAPI:
    """An ASGI app serving ``engine`` (which the caller starts and closes, e.g. around ``uvicorn``). Request bodies
    larger than ``max_body_bytes`` are refused with 413; with ``api_key``, ``/v1`` requires it as a bearer token.
    ``stream_interval`` > 1: a streamed response is written once that many tokens wait (the first and the last at
    once), each write carrying one event per token: less server CPU per token, tokens arriving in groups."""
    if not isinstance(stream_interval, int) or isinstance(stream_interval, bool) or stream_interval < 1:
        raise ValueError(f"stream_interval must be an integer >= 1, got {stream_interval!r}")
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    server = _Server(
        engine=engine,
        name=model_name or getattr(engine.model.config, "_name_or_path", None) or "acb-default",
        created=int(time.time()),
        metrics=ServerMetrics(engine),
        stream_interval=stream_interval,
    )
    app = FastAPI(title="acb", summary="OpenAI-compatible API over an acb engine")
    app.state.acb = server
    app.state.engine = engine
    app.add_middleware(
        BodyLimit,
        max_bytes=max_body_bytes,
        on_refused=lambda path: server.metrics.requests.labels(path if path in _ENDPOINTS else "other", "413").inc(),
    )
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"], response_model=ModelList)
    app.add_api_route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"], response_model=ModelCard)
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


# -- errors -------------------------------------------------------------------------------------------------------


def _error_for(exc: Exception, req=None) -> JSONResponse:
    if isinstance(exc, InvalidRequestError):
        param = getattr(exc, "param", None)  # an unsupported field names itself; acb's names map to OpenAI's
        param = param if isinstance(exc, UnsupportedFieldError) else openai_param(param, req)
        return error_response(400, str(exc), "invalid_request_error", param)
    if isinstance(exc, EngineClosedError):
        return error_response(503, str(exc), "service_unavailable")
    return error_response(500, str(exc) or type(exc).__name__, "server_error")


async def _invalid_body(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        where = first.get("loc", ("body", None))[-1]
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')}"
        message += f" at character {where})" if isinstance(where, int) else ")"
        response = error_response(400, message, "invalid_request_error")
    else:
        # the field's path, without the names pydantic gives a union's branches ("stop.str" is "stop")
        loc = ".".join(str(p) for p in first.get("loc", ())[1:] if not _UNION_BRANCH.fullmatch(str(p))) or None
        message = f"{loc or 'body'}: {first.get('msg', 'invalid request')}"
        response = error_response(400, message, "invalid_request_error", loc)
    return _server(request).count(request.url.path if request.url.path in _ENDPOINTS else "other", response)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own errors (an unknown path, a body that is not UTF-8) in the same shape as every other."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return error_response(exc.status_code, detail, kind, code="not_found" if exc.status_code == 404 else None)


def _server(request: Request) -> _Server:
    return request.app.state.acb


# -- plain endpoints ----------------------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    engine = _server(request).engine
    return JSONResponse({"status": "ok" if engine.running else engine.state}, 200 if engine.running else 503)


async def prometheus(request: Request) -> Response:
    registry = await _server(request).metrics.exported()
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> ModelList:
    server = _server(request)
    return ModelList(data=[ModelCard(id=server.name, created=server.created)])


async def retrieve_model(model_id: str, request: Request):
    server = _server(request)
    if model_id != server.name:
        return _model_not_found(model_id, server)
    return ModelCard(id=server.name, created=server.created)


def _model_not_found(model: str, server: _Server) -> JSONResponse:
    return error_response(
        404, f"The model '{model}' does not exist; this server serves '{server.name}'", "invalid_request_error",
        "model", "model_not_found",
    )  # fmt: skip


# -- generation ---------------------------------------------------------------------------------------------------


async def completions(req: CompletionRequest, request: Request) -> Response:
    server = _server(request)
    endpoint = "/v1/completions"
    if req.model not in (None, server.name):
        return server.count(endpoint, _model_not_found(req.model, server))
    return await _respond(server, request, endpoint, req, _prompts(req.prompt), chat=False)


async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    server = _server(request)
    endpoint = "/v1/chat/completions"
    if req.model not in (None, server.name):
        return server.count(endpoint, _model_not_found(req.model, server))
    try:
        prompt = await server.engine.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages])
    except AcbError as exc:
        return server.count(endpoint, _error_for(exc, req))
    return await _respond(server, request, endpoint, req, [prompt], chat=True)


async def _respond(server: _Server, request: Request, endpoint: str, req, prompts: list, chat: bool) -> Response:
    engine, metrics = server.engine, server.metrics
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    arrival = time.perf_counter()
    streams: list[RequestStream] = []
    try:  # admission: a bad request gets its 400 here, before any response starts
        params = to_sampling_params(req, engine.default_params)
        # n samples per prompt (best_of: that many, ranked when done); choice index = prompt * n + sample
        count = params.best_of or params.n
        if len(prompts) * count > MAX_CHOICES:
            raise InvalidRequestError(
                f"{len(prompts)} prompts x {count} samples is more than the {MAX_CHOICES} choices one request may ask"
                " for; split it", param="prompt" if len(prompts) > 1 else "n",
            )  # fmt: skip
        one = dataclasses.replace(params, n=count, best_of=None, logprobs=params.logprobs or count > params.n)
        # a plain response reads its streams whole: woken for the first token and the last, not for each
        interval = server.stream_interval if req.stream else _WHOLE

        async def admit() -> None:  # prompt after prompt; each may wait for room in the engine's queue
            for i, p in enumerate(prompts):
                rid_i = f"{rid}-{i}"
                if count == 1:
                    streams.append(await engine.submit(p, one, request_id=rid_i, stream_interval=interval))
                else:
                    streams.extend(await engine.submit_choices(p, one, request_id=rid_i, stream_interval=interval))

        await _until_disconnect(request, admit())  # a client that leaves meanwhile submits nothing more
    except (AcbError, _Disconnected) as exc:
        return await _end(server, endpoint, streams, exc, req)
    # Wait for every first token: a failure in the first step is still a proper HTTP error, and a client that
    # leaves meanwhile aborts its requests (they may still be queued).
    try:
        firsts = await _until_disconnect(
            request, asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        )
    except _Disconnected as exc:
        return await _end(server, endpoint, streams, exc, req)
    if errors := [f for f in firsts if isinstance(f, BaseException)]:
        if not isinstance(errors[0], Exception):
            for s in streams:
                await s.aclose()
            raise errors[0]  # cancellation and the like
        return await _end(server, endpoint, streams, errors[0], req)
    metrics.ttft.observe(time.perf_counter() - arrival)
    prompt_tokens = sum(s.num_prompt_tokens for s in streams[::count])  # each prompt once, whatever its samples
    metrics.prompt_tokens.inc(prompt_tokens)
    logprobs = params.logprobs
    if req.stream:  # (best_of > n was refused for streams)
        metrics.requests.labels(endpoint, "200").inc()
        include_usage = (req.stream_options or {}).get("include_usage", False)  # a bool (to_sampling_params)
        body = sse(server, rid, streams, firsts, chat, include_usage, logprobs, prompt_tokens)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        results = await _until_disconnect(request, asyncio.gather(*(collect(s, f) for s, f in zip(streams, firsts))))
    except (AcbError, _Disconnected) as exc:  # a failed sample (or the engine closing) ends its siblings too
        return await _end(server, endpoint, streams, exc, req)
    completion_tokens = sum(sum(t.id is not None for t in toks) for toks in results)
    metrics.generated_tokens.inc(completion_tokens)
    if count > params.n:  # best_of: keep each prompt's n most likely samples, best first
        results = [
            toks
            for g in range(0, len(results), count)
            for toks in sorted(results[g : g + count], key=cumulative_logprob, reverse=True)[: params.n]
        ]
    usage = Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
    metrics.requests.labels(endpoint, "200").inc()
    created = int(time.time())
    if chat:
        choices = [
            ChatChoice(
                index=i,
                message=ChatMessageOut(content="".join(t.text for t in toks)),
                logprobs=chat_logprobs(server, toks) if logprobs else None,
                finish_reason=toks[-1].finish_reason,
            )
            for i, toks in enumerate(results)
        ]
        body = ChatCompletionResponse(id=rid, created=created, model=server.name, choices=choices, usage=usage)
    else:
        choices = [
            CompletionChoice(
                index=i,
                text="".join(t.text for t in toks),
                logprobs=completion_logprobs(server, toks) if logprobs else None,
                finish_reason=toks[-1].finish_reason,
            )
            for i, toks in enumerate(results)
        ]
        body = CompletionResponse(id=rid, created=created, model=server.name, choices=choices, usage=usage)
    return JSONResponse(body.model_dump())


async def _end(server: _Server, endpoint: str, streams: list, exc: Exception, req) -> Response:
    """A request that ends before its response: every stream of it closed, then 499 for a client that went away
    (nobody reads it) or the error's response."""
    for s in streams:
        await s.aclose()
    if isinstance(exc, _Disconnected):
        return server.count(endpoint, Response(status_code=499))
    return server.count(endpoint, _error_for(exc, req))


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], list):
        return list(prompt)
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt) if prompt else [""]


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


# -- running it ---------------------------------------------------------------------------------------------------


async def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    log_level: str = "info",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    stream_interval: int = 1,
    timeout_keep_alive: float | None = None,
) -> None:
    """Run the API under uvicorn on the running loop until cancelled or signalled; the engine must be started.

    ``on_ready(url)`` is called once the socket is bound (a failed bind raises instead); ``stream_interval`` as in
    :func:`create_app`; ``timeout_keep_alive``: seconds an idle connection stays open (``None``:
    :data:`DEFAULT_TIMEOUT_KEEP_ALIVE_S`). Health probes are not written to the access log. On SIGTERM or SIGINT
    the server stops accepting connections and closes the engine at once, so open requests get ``drain_timeout`` to
    finish (then end with an error): shutdown takes at most about ``drain_timeout``."""
    import logging

    import uvicorn

    class _Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                bound = self.servers[0].sockets[0].getsockname() if self.servers else (host, port)
                on_ready(f"http://{bound[0]}:{bound[1]}")

        async def shutdown(self, sockets=None) -> None:
            closing = asyncio.ensure_future(engine.close(drain=True))
            try:
                await super().shutdown(sockets)
            finally:
                await closing

    config = uvicorn.Config(
        create_app(engine, model_name, max_body_bytes=max_body_bytes, api_key=api_key, stream_interval=stream_interval),
        host=host,
        port=port,
        log_level=log_level,
        loop="none",
        lifespan="off",
        timeout_keep_alive=keep_alive_seconds(timeout_keep_alive),
        timeout_graceful_shutdown=engine.config.drain_timeout + 1.0,
    )
    logging.getLogger("uvicorn.access").addFilter(_quiet_health)
    uv = _Uvicorn(config)
    try:
        await uv.serve()
    except SystemExit:  # uvicorn exits the process when it cannot bind: the caller decides that, not a library
        uv.started = False
    if not uv.started:
        raise OSError(f"could not serve on {host}:{port} (see the log above)")


def keep_alive_seconds(value: float | None) -> float:
    """``value`` checked as a keep-alive time (seconds > 0, finite); ``None``: :data:`DEFAULT_TIMEOUT_KEEP_ALIVE_S`.
    uvicorn takes anything: ``None`` breaks every response, a negative time closes each connection after one."""
    if value is None:
        return DEFAULT_TIMEOUT_KEEP_ALIVE_S
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ValueError(f"timeout_keep_alive must be a number of seconds > 0, got {value!r}")
    return float(value)


def _quiet_health(record) -> bool:
    """Keep health probes out of the access log (uvicorn's access records carry the path in their args)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (len(args) >= 3 and str(args[2]).split("?")[0] == "/health")
