"""A FastAPI app that streams completions from an acb engine, and refuses bad requests before it streams.

The pattern: ``stream = await engine.submit(prompt, params)`` validates and queues the request, so a bad prompt
raises a typed error (here turned into a 400) before the response starts; only then is the stream handed to
``StreamingResponse``. Leaving a stream unread, or a client disconnecting mid-stream, ends the request.

    python examples/fastapi_app.py          # runs the app in-process and calls it with httpx
"""

import asyncio
import contextlib

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

import acb
from acb import Engine, InvalidRequestError, SamplingParams
from acb.default_model import load_default


class Ask(BaseModel):
    prompt: str
    max_new_tokens: int = 16


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI()

    @app.post("/ask")
    async def ask(body: Ask):
        try:
            stream = await engine.submit(body.prompt, SamplingParams(max_new_tokens=body.max_new_tokens))
        except InvalidRequestError as exc:  # nothing was streamed yet: a proper error status
            return JSONResponse({"error": str(exc), "param": exc.param}, status_code=400)

        async def text():
            async with contextlib.aclosing(stream):
                async for tok in stream:
                    yield tok.text

        return StreamingResponse(text(), media_type="text/plain")

    return app


async def main() -> None:
    model, tokenizer = load_default()
    async with Engine(model, tokenizer) as engine:
        transport = httpx.ASGITransport(app=build_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            good, bad = await asyncio.gather(
                client.post("/ask", json={"prompt": "Tell me about the sea"}),
                client.post("/ask", json={"prompt": ""}),
            )
    print(f"good: {good.status_code} {good.text[:40]!r}")
    print(f"bad: {bad.status_code} {bad.json()}")


if __name__ == "__main__":
    acb.run(main())
