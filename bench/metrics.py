"""Benchmark metrics: latency percentiles, GPU idle fraction, event-loop lag, and the decode roofline."""

from __future__ import annotations

import asyncio
import time

__all__ = ["percentile", "idle_fraction", "LoopLag", "decode_floor_seconds"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def idle_fraction(intervals: list[tuple[float, float]]) -> float:
    """Share of the span from the first step's start to the last step's end in which no step's GPU work ran.

    Intervals are (start, end) of each step's GPU work, measured with CUDA events recorded before the step's first
    copy and after its last one. Gaps between kernels *inside* one step (an eager step whose host launches slower
    than the GPU runs) count as busy, so for eager steps this is a lower bound of the idle time.
    """
    if not intervals:
        return float("nan")
    ivs = sorted(intervals)
    busy, cur_s, cur_e = 0.0, ivs[0][0], ivs[0][1]
    for s, e in ivs[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = max(e for _, e in ivs) - ivs[0][0]
    return max(0.0, 1.0 - busy / span) if span > 0 else 0.0


class LoopLag:
    """A heartbeat coroutine: sleeps 1 ms and records how late it wakes (ms)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _beat(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append((time.perf_counter() - t - 0.001) * 1e3)

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def decode_floor_seconds(
    weight_bytes: int, kv_bytes_per_token: int, requests: list[tuple[int, int]], bandwidth: float, max_batch: int
) -> float:
    """Lower bound of the decode time: every decode step reads the weights once plus every running sequence's KV.

    ``requests`` are ``(prompt_len, new_tokens)``; sequences run in waves of ``max_batch`` in arrival order.
    """
    total = 0.0
    for w0 in range(0, len(requests), max_batch):
        wave = requests[w0 : w0 + max_batch]
        steps = max(n for _, n in wave)
        for s in range(steps):
            kv = sum((p + s) for p, n in wave if s < n)
            total += (weight_bytes + kv * kv_bytes_per_token) / bandwidth
    return total
