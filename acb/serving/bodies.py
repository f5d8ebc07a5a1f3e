"""Response bodies in OpenAI's shapes: a request's tokens collected into choices, logprobs (with their
alternatives), and the server-sent-event stream of a streaming response."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..outputs import Token
from ..stream import RequestStream
from .protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    TopLogprob,
    Usage,
)

if TYPE_CHECKING:
    from .app import _Server

__all__ = ["collect", "cumulative_logprob", "chat_logprobs", "completion_logprobs", "sse"]


async def collect(stream: RequestStream, first: Token) -> list[Token]:
    toks = [first]
    if first.finish_reason is None:
        async for tok in stream:
            toks.append(tok)
    return toks


def cumulative_logprob(toks: list[Token]) -> float:
    return sum(t.logprob for t in toks if t.logprob is not None)


def chat_logprobs(server: _Server, toks: list[Token]) -> ChatLogprobs:
    def alternatives(t: Token) -> list[TopLogprob]:
        texts = [server.token_text(i) for i, _ in t.top_logprobs or ()]
        return [
            TopLogprob(token=x, logprob=lp, bytes=list(x.encode())) for x, (_, lp) in zip(texts, t.top_logprobs or ())
        ]

    return ChatLogprobs(
        content=[ChatTokenLogprob(token=t.text, logprob=t.logprob, bytes=list(t.text.encode()),
                                  top_logprobs=alternatives(t)) for t in toks if t.id is not None]
    )  # fmt: skip


def completion_logprobs(server: _Server, toks: list[Token], offset: int = 0) -> CompletionLogprobs:
    """The completions API's logprobs of ``toks`` (what a choice emitted from character ``offset`` of its text on):
    per token its text, logprob, alternatives and where its text starts in the choice's text."""
    kept, offsets, at = [], [], offset
    for t in toks:
        if t.id is not None:
            kept.append(t)
            offsets.append(at)
        at += len(t.text)
    top = None
    if any(t.top_logprobs for t in kept):
        top = [{server.token_text(i): lp for i, lp in t.top_logprobs or ()} for t in kept]
    return CompletionLogprobs(tokens=[t.text for t in kept], token_logprobs=[t.logprob for t in kept],
                              top_logprobs=top, text_offset=offsets)  # fmt: skip


_MARK = "\x00acb-text\x00"  # stands for a token's text while a response's chunk template is made


async def sse(
    server: _Server,
    rid: str,
    streams: list,
    firsts: list,
    chat: bool,
    include_usage: bool,
    logprobs: bool,
    prompt_tokens: int = 0,
) -> AsyncIterator[str]:
    """Server-sent events: every stream's tokens as chunks (with their logprobs when asked), a usage chunk if asked
    (``prompt_tokens``: the request's, each prompt counted once whatever its samples), then ``[DONE]``. A stream
    that fails mid-way sends an error event and ends.

    The hot path is one chunk per token per stream, on the engine's event loop: a plain token (text, no logprobs, not
    the last) is its choice's chunk template (the JSON the models dump, made once per choice) around the token's
    JSON-encoded text, with no model built; the tokens already waiting when the consumer wakes go out as one write;
    a single stream (n = 1, the common case) is read directly, several through a queue that their pump tasks fill."""
    created = int(time.time())
    counts = [0] * len(streams)
    chars = [0] * len(streams)  # each choice's text so far (completions' text_offset)
    templates: dict[int, tuple[str, str] | None] = {}

    def chunk(i: int, tok: Token | None, role: bool = False) -> str:
        lp = logprobs and tok is not None and tok.id is not None
        finish = None if tok is None else tok.finish_reason
        if chat:
            delta = ChatDelta(role="assistant", content="") if role else ChatDelta(content=tok.text or None)
            choice = ChatChunkChoice(
                index=i, delta=delta, logprobs=chat_logprobs(server, [tok]) if lp else None, finish_reason=finish
            )
            body = ChatCompletionChunk(id=rid, created=created, model=server.name, choices=[choice])
        else:
            choice = CompletionChoice(
                index=i,
                text=tok.text,
                logprobs=completion_logprobs(server, [tok], chars[i]) if lp else None,
                finish_reason=finish,
            )
            body = CompletionChunk(id=rid, created=created, model=server.name, choices=[choice])
        data = body.model_dump()
        if chat:  # deltas carry only what changed, as OpenAI's do
            data["choices"][0]["delta"] = choice.delta.model_dump(exclude_none=True)
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def render(i: int, item) -> str:
        """The event(s) for one item of stream ``i`` (a token, or the exception that ended the stream)."""
        if isinstance(item, Exception):
            err = {"error": {"message": str(item), "type": "server_error", "param": None, "code": None}}
            return f"data: {json.dumps(err)}\n\n"
        if item.id is not None:
            counts[i] += 1
        event = _event(i, item)
        chars[i] += len(item.text)
        return event

    def _event(i: int, item: Token) -> str:
        if item.finish_reason is None and item.text and not logprobs:
            if i not in templates:
                parts = chunk(i, Token(None, _MARK)).split(json.dumps(_MARK, ensure_ascii=False))
                templates[i] = (parts[0], parts[1]) if len(parts) == 2 else None
            template = templates[i]
            if template is not None:
                return template[0] + json.dumps(item.text, ensure_ascii=False) + template[1]
        if item.text or item.finish_reason or (logprobs and item.id is not None):
            return chunk(i, item)
        return ""

    items = _one(streams[0], firsts[0]) if len(streams) == 1 else _merged(streams, firsts)
    sent = 0
    try:
        if chat:
            yield "".join(chunk(i, None, role=True) for i in range(len(streams)))
        async for batch in items:
            out = "".join(render(i, item) for i, item in batch)
            total = sum(counts)
            server.metrics.generated_tokens.inc(total - sent)
            sent = total
            if out:
                yield out
        if include_usage:
            usage = Usage(
                prompt_tokens=prompt_tokens, completion_tokens=sum(counts), total_tokens=prompt_tokens + sum(counts)
            )
            tail = (ChatCompletionChunk if chat else CompletionChunk)(
                id=rid, created=created, model=server.name, choices=[], usage=usage
            )
            yield f"data: {json.dumps(tail.model_dump())}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also on client disconnect: Starlette cancels this generator, and every stream is aborted
        server.metrics.generated_tokens.inc(sum(counts) - sent)
        await items.aclose()
        for s in streams:
            await s.aclose()


async def _one(stream: RequestStream, first: Token) -> AsyncIterator[list]:
    """One stream's items in batches of ``(0, item)``: each batch is what was waiting when the reader woke (an
    exception that ends the stream is the last item)."""
    yield [(0, first)]
    if first.finish_reason is not None:
        return
    batch: list = []
    try:
        async for tok in stream:
            batch = [(0, tok)]
            while tok.finish_reason is None and stream.num_ready:
                tok = await stream.__anext__()  # waiting already: returns without suspending
                batch.append((0, tok))
            yield batch
            batch = []
            if tok.finish_reason is not None:
                return
    except Exception as exc:  # after the tokens read before it (stream_interval > 1 reads several at once)
        yield [*batch, (0, exc)]


async def _merged(streams: list, firsts: list) -> AsyncIterator[list]:
    """Several streams' items, ``(choice index, item)``, in the order they came, batched as in :func:`_one`."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream, first):
        try:
            queue.put_nowait((i, first))
            if first.finish_reason is None:
                async for tok in stream:
                    queue.put_nowait((i, tok))
        except Exception as exc:
            queue.put_nowait((i, exc))

    pumps = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
    try:
        open_ = len(streams)
        while open_:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            open_ -= sum(1 for _, item in batch if isinstance(item, Exception) or item.finish_reason is not None)
            yield batch
    finally:
        for p in pumps:
            p.cancel()
