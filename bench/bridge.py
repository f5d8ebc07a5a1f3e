"""Measure the completion bridge: wake-up latency, CPU cost, and behaviour under a busy event loop.

    python -m bench.bridge [--trials 40] [--ms 5]

Each trial keeps the GPU busy for a fixed time (``torch.cuda._sleep``), records an event, and times how long each
waiting method takes to resume after the launch. The added latency of a method is its median minus the median of a
blocking spin on ``event.query()`` (the fastest possible, and useless in an event loop since it blocks it).
"Busy loop" adds a coroutine that runs Python work in 2 ms slices between ``sleep(0)`` yields, like an engine's
scheduling and detokenization do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from acb.bridge import CompletionBridge


def _calibrate(ms: float) -> int:
    print("calibrating", flush=True)
    cycles = 1_000_000
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    t = time.perf_counter()
    torch.cuda._sleep(cycles * 10)
    torch.cuda.synchronize()
    per_cycle = (time.perf_counter() - t) / (cycles * 10)
    return int(ms / 1e3 / per_cycle)


async def _busy(stop: asyncio.Event) -> None:
    while not stop.is_set():
        end = time.perf_counter() + 0.002
        x = 0
        while time.perf_counter() < end:
            x += 1
        await asyncio.sleep(0)


async def _measure(method: str, cycles: int, trials: int, busy: bool) -> dict:
    bridge = CompletionBridge()
    stop = asyncio.Event()
    hog = asyncio.create_task(_busy(stop)) if busy else None
    waits, cpu = [], []
    timeouts = 0
    for _ in range(trials):
        torch.cuda._sleep(cycles)
        ev = torch.cuda.Event()
        ev.record()
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "spin":
            while not ev.query():
                pass
        elif method == "acb-bridge":
            await bridge._wait_event(ev)
        elif method == "sleep0-poll":
            while not ev.query():
                await asyncio.sleep(0)
        elif method == "thread-synchronize":
            try:
                await asyncio.wait_for(asyncio.to_thread(ev.synchronize), 5)
            except TimeoutError:  # seen on the H100: the thread never reported back within 5 s
                timeouts += 1
        waits.append(time.perf_counter() - t0)
        cpu.append((time.process_time() - c0) / max(waits[-1], 1e-9))
        await asyncio.sleep(0.002)
    stop.set()
    if hog is not None:
        await hog
    return {"median_ms": statistics.median(waits) * 1e3, "p99_ms": sorted(waits)[int(0.99 * (len(waits) - 1))] * 1e3,
            "cpu_share": statistics.median(cpu), "timeouts": timeouts}  # fmt: skip


async def main_async(args) -> list[dict]:
    cycles = _calibrate(args.ms)
    print(f"{cycles} cycles per trial", flush=True)
    spin = await _measure("spin", cycles, args.trials, busy=False)  # a blocking spin: the floor, not an option
    print(spin, flush=True)
    rows = [dict(spin, method="spin", busy_loop=False, added_ms=0.0)]
    trials = {"thread-synchronize": max(3, args.trials // 5)}  # it may stall for seconds per wait
    for busy in (False, True):
        for method in ("acb-bridge", "sleep0-poll", "thread-synchronize"):
            r = await _measure(method, cycles, trials.get(method, args.trials), busy)
            r.update(method=method, busy_loop=busy, added_ms=r["median_ms"] - spin["median_ms"])
            rows.append(r)
            print(r, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--ms", type=float, default=5.0, help="GPU work per trial")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = asyncio.run(main_async(args))
    print(f"{torch.cuda.get_device_name()}, GPU work {args.ms} ms per trial, {args.trials} trials")
    print("| method | busy loop | median wait ms | p99 ms | added latency ms | CPU (share of a core) | waits > 5 s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {'yes' if r['busy_loop'] else 'no'} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} | "
              f"{r['added_ms']:+.3f} | {r['cpu_share'] * 100:.0f} % | {r['timeouts']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
