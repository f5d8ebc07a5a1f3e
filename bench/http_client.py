"""W-serve's load generator: requests fired on a Poisson schedule, and the HTTP client that streams them from the
OpenAI server in a process of its own.

A client in the server's own process and event loop measures that one core parsing both ends of every streamed
chunk: on an H200, the HTTP rows then stopped at ~4,100 output tok/s and ~20 req/s whatever the rate, with the
loop 30-46 ms late (docs/benchmarks.md). Users' clients run elsewhere, so this module imports neither torch nor acb
and :func:`run_client` is what ``bench.serve`` starts in a fresh process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["Timing", "arrival_times", "drive", "run_client", "serving"]

CLIENT_KEEPALIVE_EXPIRY_S = 5.0  # :func:`run_client`'s httpx keepalive_expiry: below the server's (acb serve's default)


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of ``n`` requests arrives: a Poisson process of ``rate`` requests per
    second (exponential gaps from a fixed seed); ``inf``: all at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclasses.dataclass
class Timing:
    ttft: list[float] = dataclasses.field(default_factory=list)
    itl: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0
    failed: int = 0
    wall_s: float = 0.0
    pid: int = dataclasses.field(default_factory=os.getpid)  # the process that measured


Send = Callable[[list[int], int, float, Timing], Awaitable[None]]
"""``send(prompt, new tokens, arrival time, timing)``: one request, recording its TTFT and inter-token gaps."""


async def drive(requests: list, rate: float, seed: int, send: Send) -> Timing:
    """Every request of ``requests`` (``(prompt ids, new tokens)``) sent at its arrival time; TTFT counts from the
    scheduled arrival, so queueing at overload shows. A failure is counted and reported, never dropped."""
    times = arrival_times(len(requests), rate, seed)
    timing = Timing()
    start = time.perf_counter()

    async def fire(i: int) -> None:
        arrival = start + times[i]
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        prompt, new = requests[i]
        try:
            await send(prompt, new, arrival, timing)
        except Exception as exc:
            timing.failed += 1
            now = time.perf_counter()
            print(f"request {i} failed {now - start:.2f} s into the run, {now - arrival:.2f} s after its arrival: "
                  f"{exc!r}", file=sys.stderr)  # fmt: skip

    await asyncio.gather(*(fire(i) for i in range(len(requests))))
    timing.wall_s = time.perf_counter() - start
    return timing


async def via_http(client, prompt: list[int], new: int, arrival: float, t: Timing) -> None:
    body = {"prompt": prompt, "max_tokens": new, "stream": True, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}  # fmt: skip
    last, lines, status = None, 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            status = r.status_code
            if r.status_code != 200:
                t.failed += 1
                await r.aread()
                return
            async for line in r.aiter_lines():
                lines += 1
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    t.failed += 1
                    continue
                if chunk.get("usage"):  # the last chunk: how many tokens the request generated
                    t.tokens += chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()  # a chunk per token that adds text (a partial character waits for the next)
                if last is None:
                    t.ttft.append(now - arrival)
                else:
                    t.itl.append(now - last)
                last = now
    except Exception as exc:  # say how far the response had come (a transport error carries no more)
        progress = "before any response" if status is None else f"after status {status} and {lines} lines"
        raise RuntimeError(f"{exc!r} {progress}") from exc


def run_client(port: int, requests: list, rate: float, seed: int) -> Timing:
    """The client process's work: every request through ``http://127.0.0.1:port`` (on uvloop when installed)."""
    import httpx

    async def main() -> Timing:
        # idle connections expire here well before the server closes them (acb serve's; at equal times a request
        # sent as the server closes its connection fails with ReadError before any response, and is not retried)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None,
                              keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY_S)  # fmt: skip
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None, limits=limits) as client:
            return await drive(requests, rate, seed, lambda p, n, a, t: via_http(client, p, n, a, t))

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


@contextlib.asynccontextmanager
async def serving(app) -> AsyncIterator[int]:
    """``app`` (ASGI) under uvicorn on the running loop, on a free local port (yielded), until the block ends: the
    server side of every HTTP measurement (the client runs elsewhere, :func:`run_client`)."""
    import uvicorn

    from acb.serving.app import DEFAULT_TIMEOUT_KEEP_ALIVE_S

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            timeout_keep_alive=DEFAULT_TIMEOUT_KEEP_ALIVE_S)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task
