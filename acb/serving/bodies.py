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


def completion_logprobs(server: _Server, toks: list[Token]) -> CompletionLogprobs:
    toks = [t for t in toks if t.id is not None]
    top = None
    if any(t.top_logprobs for t in toks):
        top = [{server.token_text(i): lp for i, lp in t.top_logprobs or ()} for t in toks]
    return CompletionLogprobs(tokens=[t.text for t in toks], token_logprobs=[t.logprob for t in toks], top_logprobs=top)


async def sse(
    server: _Server, rid: str, streams: list, firsts: list, chat: bool, include_usage: bool, logprobs: bool
) -> AsyncIterator[str]:
    """Server-sent events: every stream's tokens as chunks (with their logprobs when asked), a usage chunk if asked,
    then ``[DONE]``. A stream that fails mid-way sends an error event and ends."""
    created = int(time.time())
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
                logprobs=completion_logprobs(server, [tok]) if lp else None,
                finish_reason=finish,
            )
            body = CompletionChunk(id=rid, created=created, model=server.name, choices=[choice])
        data = body.model_dump()
        if chat:  # deltas carry only what changed, as OpenAI's do
            data["choices"][0]["delta"] = choice.delta.model_dump(exclude_none=True)
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    pumps = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
    try:
        if chat:
            for i in range(len(streams)):
                yield chunk(i, None, role=True)
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
                server.metrics.generated_tokens.inc()
            if item.text or item.finish_reason or (logprobs and item.id is not None):
                yield chunk(i, item)
            if item.finish_reason is not None:
                open_ -= 1
        if include_usage:
            prompt_tokens = sum(s.num_prompt_tokens for s in streams)
            usage = Usage(
                prompt_tokens=prompt_tokens, completion_tokens=sum(counts), total_tokens=prompt_tokens + sum(counts)
            )
            tail = (ChatCompletionChunk if chat else CompletionChunk)(
                id=rid, created=created, model=server.name, choices=[], usage=usage
            )
            yield f"data: {json.dumps(tail.model_dump())}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also on client disconnect: Starlette cancels this generator, and every stream is aborted
        for p in pumps:
            p.cancel()
        for s in streams:
            await s.aclose()
