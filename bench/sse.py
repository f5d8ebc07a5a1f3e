"""The OpenAI server's streaming writer, alone: µs of event-loop CPU per streamed token in ``acb.serving.bodies.sse``
(building each chunk's JSON, the metrics, the hand-over between streams), without HTTP or an engine.

Under W-serve the server writes one chunk per token on the engine's event loop: at 8,000 tok/s, 25 µs a token is a
fifth of the loop. Each of ``--streams`` concurrent responses reads a stand-in stream of ``--tokens`` tokens that
delivers one token per loop turn (``--burst`` > 1: that many at once, as multi-step decode does)::

    python -m bench.sse                      # completions and chat, n = 1 and n = 4
    python -m bench.sse --http               # the whole server: uvicorn, a client process, a stand-in engine

``--http`` serves ``acb.serving.create_app`` under uvicorn on this process's loop, in front of a stand-in engine
that hands every live stream one token per ``--step-ms`` (a decode step of as many rows as there are streams), and
streams ``--streams`` completions at once from a client in another process (``bench.http_client``): tokens per
second received, and this process's CPU per token (the server, plus the stand-in's few µs of wake-ups).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import time
import types

from prometheus_client import CollectorRegistry, Counter

from acb.config import SamplingParams
from acb.outputs import Token
from acb.serving.app import _Server
from acb.serving.bodies import sse


class _Stream:
    """A RequestStream stand-in: ``n`` tokens, ``burst`` of them ready per loop turn."""

    def __init__(self, n: int, burst: int) -> None:
        self.n, self.burst, self.i, self.num_prompt_tokens = n, burst, 0, 10

    @property
    def num_ready(self) -> int:
        return 0 if self.i % self.burst == 0 or self.i >= self.n else 1

    def __aiter__(self):
        return self

    async def __anext__(self) -> Token:
        if self.i >= self.n:
            raise StopAsyncIteration
        if self.i % self.burst == 0:
            await asyncio.sleep(0)  # the next delivery: a turn of the loop
        self.i += 1
        return Token(self.i, " tok", None, "length" if self.i == self.n else None)

    async def aclose(self) -> None:
        pass


def _server() -> _Server:
    metrics = type("Metrics", (), {})()
    metrics.generated_tokens = Counter("g", "generated", registry=CollectorRegistry())
    return _Server(engine=None, name="bench", created=0, metrics=metrics)


async def measure(chat: bool, n: int, streams: int, tokens: int, burst: int) -> float:
    """µs of this thread's CPU per token written."""
    server = _server()

    async def one() -> None:
        parts = [_Stream(tokens, burst) for _ in range(n)]
        firsts = [await p.__anext__() for p in parts]
        async for _ in sse(server, "cmpl-bench", parts, firsts, chat, True, False):
            pass

    t = time.process_time()
    await asyncio.gather(*(one() for _ in range(streams)))
    return (time.process_time() - t) / (streams * n * tokens) * 1e6


class _Engine:
    """What the server needs of an engine: every stream it hands out gets one token per ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path="stand-in"))
        self.default_params = SamplingParams()
        self.tokenizer = None
        self.running, self.state = True, "running"
        self._tick = asyncio.Event()

    def stats(self):
        return types.SimpleNamespace(num_waiting=0, num_running=0, kv_blocks_free=1, kv_blocks_total=1,
                                     num_preemptions=0)  # fmt: skip

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(self.step)
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()

    async def submit(self, prompt, params, request_id=None, stream_interval=1) -> _Ticked:
        return _Ticked(params.max_new_tokens, self)


class _Ticked(_Stream):
    """A stand-in engine stream: one token per tick of its engine."""

    def __init__(self, n: int, engine: _Engine) -> None:
        super().__init__(n, 1)
        self.engine = engine

    @property
    def num_ready(self) -> int:
        return 0

    async def __anext__(self) -> Token:
        if self.i >= self.n:
            raise StopAsyncIteration
        await self.engine._tick.wait()
        self.i += 1
        return Token(self.i, " tok", None, "length" if self.i == self.n else None)


async def measure_http(streams: int, tokens: int, step: float) -> tuple[float, float, int]:
    """(tokens/s received by the client, µs of this process's CPU per token, tokens missing or failed)."""
    from acb.serving import create_app

    from .http_client import run_client, serving

    engine = _Engine(step)
    ticker = asyncio.ensure_future(engine.ticker())
    requests = [([1, 2, 3], tokens)] * streams
    async with serving(create_app(engine, "stand-in")) as port:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(pool, run_client, port, requests[:2], float("inf"), 0)
            t = time.process_time()
            timing = await loop.run_in_executor(pool, run_client, port, requests, float("inf"), 0)
            cpu = time.process_time() - t
    ticker.cancel()
    return timing.tokens / timing.wall_s, cpu / max(1, timing.tokens) * 1e6, streams * tokens - timing.tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--burst", type=int, default=1)
    ap.add_argument("--http", action="store_true", help="through uvicorn, with a client process")
    ap.add_argument("--step-ms", type=float, default=5.0, help="--http: the stand-in engine's step")
    args = ap.parse_args(argv)
    if args.http:
        from acb.loop import run

        rate, us, missing = run(measure_http(args.streams, args.tokens, args.step_ms / 1e3))
        offered = args.streams / args.step_ms * 1e3
        print(f"http, {args.streams} streams: {rate:,.0f} tok/s received (offered {offered:,.0f}), {us:.1f} µs of "
              f"server CPU per token, {missing} tokens missing")  # fmt: skip
        return
    for chat in (False, True):
        for n in (1, 4):
            us = asyncio.run(measure(chat, n, args.streams // n, args.tokens, args.burst))
            print(f"{'chat' if chat else 'completions'}, n={n}: {us:.1f} µs per token")


if __name__ == "__main__":
    main()
