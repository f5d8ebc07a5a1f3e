"""The OpenAI server's streaming writer, alone: µs of event-loop CPU per streamed token in ``acb.serving.bodies.sse``
(building each chunk's JSON, the metrics, the hand-over between streams), without HTTP or an engine.

Under W-serve the server writes one chunk per token on the engine's event loop: at 8,000 tok/s, 25 µs a token is a
fifth of the loop. Each of ``--streams`` concurrent responses reads a stand-in stream of ``--tokens`` tokens that
delivers one token per loop turn (``--burst`` > 1: that many at once, as multi-step decode does)::

    python -m bench.sse                      # completions and chat, n = 1 and n = 4
"""

from __future__ import annotations

import argparse
import asyncio
import time

from prometheus_client import CollectorRegistry, Counter

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--burst", type=int, default=1)
    args = ap.parse_args(argv)
    for chat in (False, True):
        for n in (1, 4):
            us = asyncio.run(measure(chat, n, args.streams // n, args.tokens, args.burst))
            print(f"{'chat' if chat else 'completions'}, n={n}: {us:.1f} µs per token")


if __name__ == "__main__":
    main()
