"""Cold start: the first batch a fresh process serves, against the same batch on an engine that already served one.

Each run is its own process (a fresh Triton and allocator state); in it, engine 1 is built and started (timed:
build, start with or without the warm-up), serves one W-side-shaped batch (32 × 256 → ``--new``), closes; engine 2
on the same model serves the same batch. The report is TTFT p50/p99 of both batches and their ratio::

    python -m bench.coldstart --out results/coldstart.json      # runs warm-up on and off, one process each
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time


async def _measure(model_name: str, warmup: bool, new: int) -> dict:
    import torch

    from acb import Engine, EngineConfig

    from .run import run_one
    from .workloads import WORKLOADS, build_model, make_requests, synthetic_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(model_name, device)
    vocab = model.config.vocab_size
    tokenizer = synthetic_tokenizer(vocab)
    w = WORKLOADS["W-side"]
    requests = [(p, new) for p, _ in make_requests(w, vocab, seed=0)]
    out = {"model": model_name, "warmup": warmup, "device": device, "new": new, "requests": len(requests)}
    if device == "cuda":
        out["card"] = torch.cuda.get_device_name()
    for n in (1, 2):
        t0 = time.perf_counter()
        engine = Engine(model, tokenizer, EngineConfig(warmup=warmup, max_model_len=w.prompt + new + 16))
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        async with engine:
            started = time.perf_counter() - t0
            r = await run_one(engine, requests)
        out[f"engine{n}"] = {"build_s": build, "start_s": started, "startup": engine.startup,
                             "ttft_p50_ms": r["ttft_p50_ms"], "ttft_p99_ms": r["ttft_p99_ms"],
                             "tok_per_s": r["tok_per_s"]}  # fmt: skip
        del engine
    out["first_over_second_p50"] = out["engine1"]["ttft_p50_ms"] / out["engine2"]["ttft_p50_ms"]
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| warm-up | Triton cache | card | model | engine build s | start s | first batch TTFT p50 / p99 ms | "
        "second engine TTFT p50 / p99 ms | first / second (p50) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["engine1"], r["engine2"]
        lines.append(
            f"| {'on' if r['warmup'] else 'off'} | {r.get('triton_cache', '?')} | {r.get('card', r['device'])} | "
            f"{r['model']} | {a['build_s']:.2f} | "
            f"{a['start_s']:.2f} | {a['ttft_p50_ms']:.0f} / {a['ttft_p99_ms']:.0f} | "
            f"{b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} | {r['first_over_second_p50']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--new", type=int, default=64, help="output tokens per request")
    ap.add_argument("--one", choices=["on", "off"], help="(internal) measure in this process, print JSON")
    ap.add_argument("--runs", default="off,on,on-reused", help="which of off, on, on-reused (see main) to run")
    ap.add_argument("--out", help="write the runs' results here")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(asyncio.run(_measure(args.model, args.one == "on", args.new))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up off and on, each with a fresh Triton cache (a new machine or container); then on again, reusing
        # the second run's cache (a persistent compile cache: TRITON_CACHE_DIR on a volume)
        runs = args.runs.split(",")
        for name, mode, cache in (("off", "off", "a"), ("on", "on", "b"), ("on-reused", "on", "b")):
            if name not in runs and not (name == "on" and "on-reused" in runs):  # on-reused reuses on's cache
                continue
            env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, cache))
            cmd = [sys.executable, "-m", "bench.coldstart", "--one", mode, "--model", args.model, "--new",
                   str(args.new)]  # fmt: skip
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["triton_cache"] = "reused" if name == "on-reused" else "fresh"
            rows.append(row)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
