"""Benchmark metrics: latency percentiles, GPU idle fraction, event-loop lag, and the decode roofline."""

from __future__ import annotations

import asyncio
import time

__all__ = [
    "percentile",
    "busy_time",
    "idle_fraction",
    "step_kinds",
    "LoopLag",
    "decode_floor_seconds",
    "decode_floor",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def busy_time(intervals: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Length of the union of ``intervals`` inside ``[t0, t1]`` (overlapping or touching intervals count once)."""
    busy, edge = 0.0, t0
    for s, e in sorted(intervals):
        s, e = max(s, edge), min(e, t1)
        if e > s:
            busy += e - s
            edge = e
    return busy


def step_kind(rows: int, tokens: int, graphed: bool) -> str:
    """A step's kind for :func:`step_kinds`: decode (graph or eager) by batch size, or prompt tokens by count."""
    if tokens > rows:
        band = next((f"<= {b}" for b in (512, 2048, 4096) if tokens <= b), "> 4096")
        return f"with prompts, {band} tokens"
    band = next((f"<= {b}" for b in (32, 128, 256, 512, 1024) if rows <= b), "> 1024")
    return f"decode {'graph' if graphed else 'eager'}, {band} rows"


def step_kinds(intervals: list[tuple[float, float]], shapes: list[tuple[int, int, bool]]) -> dict[str, dict]:
    """GPU time per kind of step: ``{kind: {"steps", "gpu_s", "mean_ms", "tokens"}}``, from each step's (start, end)
    in ms and its (rows, tokens, graphed), largest GPU time first (what a step mix spends its time on)."""
    out: dict[str, dict] = {}
    for (s, e), (rows, tokens, graphed) in zip(intervals, shapes, strict=True):
        k = out.setdefault(step_kind(rows, tokens, graphed), {"steps": 0, "gpu_s": 0.0, "tokens": 0})
        k["steps"] += 1
        k["gpu_s"] += (e - s) / 1e3
        k["tokens"] += tokens
    for k in out.values():
        k["mean_ms"] = k["gpu_s"] * 1e3 / k["steps"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["gpu_s"]))


def idle_fraction(intervals: list[tuple[float, float]]) -> float:
    """Share of the span from the first step's start to the last step's end in which no step's GPU work ran.

    Intervals are (start, end) of each step's GPU work, measured with CUDA events recorded just before the step's
    first GPU work and after its last copy. Gaps between kernels *inside* one step (an eager step whose host
    launches slower than the GPU runs) count as busy, so for eager steps this is a lower bound of the idle time.
    """
    if not intervals:
        return float("nan")
    t0, t1 = min(s for s, _ in intervals), max(e for _, e in intervals)
    return max(0.0, 1.0 - busy_time(intervals, t0, t1) / (t1 - t0)) if t1 > t0 else 0.0


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

    ``requests`` are ``(prompt_len, new_tokens)``, batched continuously: at most ``max_batch`` run at once, and a
    waiting request (in arrival order) takes the slot of one that finished. Prefill is not counted.
    """
    return decode_floor(weight_bytes, kv_bytes_per_token, requests, bandwidth, max_batch)[0]


def decode_floor(
    weight_bytes: int, kv_bytes_per_token: int, requests: list[tuple[int, int]], bandwidth: float, max_batch: int
) -> tuple[float, int]:
    """:func:`decode_floor_seconds` and the number of decode steps it counted."""
    total, steps = 0.0, 0
    waiting = list(reversed(requests))
    running: list[list[int]] = []  # [context length, tokens still to generate]
    while waiting or running:
        while waiting and len(running) < max_batch:
            p, n = waiting.pop()
            running.append([p, n])
        kv = 0
        for r in running:
            kv += r[0]
            r[0] += 1
            r[1] -= 1
        total += (weight_bytes + kv * kv_bytes_per_token) / bandwidth
        steps += 1
        running = [r for r in running if r[1] > 0]
    return total, steps
