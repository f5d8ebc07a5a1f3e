"""W-serve: what users measure of a server. W-share's requests arrive on a Poisson process at several rates (and
all at once), through the engine API and through the OpenAI server with a real HTTP client (httpx, streaming);
per rate and path: throughput, TTFT and inter-token latency p50/p99, and the highest rate served with TTFT p99
under one second.

    python -m bench.serve --rates 2,4,8,16,inf --via engine,http --json r.json --markdown r.md --plot serve.png
    python -m bench.serve --model tiny --scale 0.02 --rates 20,inf     # CPU smoke run

One engine serves every run (started once, warm); the OpenAI server runs on the engine's event loop, as under
``acb serve``, and the HTTP client in a process of its own (:mod:`bench.http_client`). TTFT counts from a request's
scheduled arrival, so queueing at overload shows. Every figure names the card; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import sys
import time

import torch

from acb import Engine, EngineConfig, SamplingParams

from .http_client import Timing, arrival_times, drive, run_client, serving
from .metrics import LoopLag, percentile
from .run import _commit, parse_mode
from .workloads import WORKLOADS, build_model, make_requests, synthetic_tokenizer

__all__ = ["arrival_times", "serve_bench", "main"]

TTFT_SLO_S = 1.0


async def _via_engine(engine: Engine, prompt: list[int], new: int, arrival: float, t: Timing) -> None:
    last = None
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    async for tok in engine.stream(prompt, params):
        now = time.perf_counter()
        if last is None:
            t.ttft.append(now - arrival)
        else:
            t.itl.append(now - last)
        last = now
        t.tokens += tok.id is not None


async def _one_run(engine: Engine, requests: list, rate: float, via: str, port: int | None, seed: int) -> dict:
    """One rate through one path. ``http``: the client runs in a process of its own (:mod:`bench.http_client`)
    while this process's loop serves; the loop lag is this process's either way."""
    lag = LoopLag()
    lag.start()
    if via == "engine":
        timing = await drive(requests, rate, seed, lambda p, n, a, t: _via_engine(engine, p, n, a, t))
    else:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch, no CUDA, its own loop
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            timing = await asyncio.get_running_loop().run_in_executor(pool, run_client, port, requests, rate, seed)
    await lag.stop()
    wall = timing.wall_s
    return {
        "rate": rate,
        "via": via,
        "requests": len(requests),
        "failed": timing.failed,
        "wall_s": wall,
        "req_per_s": len(requests) / wall,
        "tok_per_s": timing.tokens / wall,
        "ttft_p50_ms": percentile(timing.ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(timing.ttft, 99) * 1e3,
        "itl_p50_ms": percentile(timing.itl, 50) * 1e3,
        "itl_p99_ms": percentile(timing.itl, 99) * 1e3,
        "loop_lag_p99_ms": percentile(lag.lags, 99),
        "client_pid": timing.pid,
    }


async def serve_bench(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    w = WORKLOADS["W-share"].scaled(args.scale)
    model = build_model(args.model or w.model, device)
    vocab = model.config.vocab_size
    tokenizer = synthetic_tokenizer(vocab)
    limit = min(model.config.max_position_embeddings, args.max_model_len)
    requests = [(p[: limit // 2], min(n, limit - min(len(p), limit // 2) - 1)) for p, n in make_requests(w, vocab)]
    _, overrides = parse_mode(f"async[{args.config}]")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=limit, **overrides)  # fmt: skip
    rates = [float(r) for r in args.rates.split(",")]
    results: list[dict] = []
    stamp = {"card": card, "commit": _commit(), "model": args.model or w.model, "workload": "W-serve",
             "config": args.config, "stream_interval": args.stream_interval,
             "api_processes": args.api_processes}  # fmt: skip
    async with Engine(model, tokenizer, config) as engine:
        await _one_run(engine, requests[:2], math.inf, "engine", None, args.seed)  # warm-up
        async with contextlib.AsyncExitStack() as stack:
            port = None
            if "http" in args.via and args.api_processes:  # the server in processes of its own
                from acb.serving.processes import api_processes

                url, _ = await stack.enter_async_context(
                    api_processes(engine, args.api_processes, model_name="bench", stream_interval=args.stream_interval)
                )
                port = int(url.rsplit(":", 1)[1])
            elif "http" in args.via:
                from acb.serving import create_app

                app = create_app(engine, "bench", stream_interval=args.stream_interval)
                port = await stack.enter_async_context(serving(app))
            for rate in rates:
                for via in args.via.split(","):
                    engine.clear_prefix_cache()
                    r = await _one_run(engine, requests, rate, via, port, args.seed)
                    r.update(stamp)
                    results.append(r)
                    print(_row(r), file=sys.stderr, flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(results, f, indent=2)
    return results


HEADER = (
    "| via | rate req/s | req/s | out tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | loop lag p99 ms | failed | card |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _row(r: dict) -> str:
    rate = "all at once" if math.isinf(r["rate"]) else f"{r['rate']:g}"
    return (
        f"| {r['via']} | {rate} | {r['req_per_s']:.2f} | {r['tok_per_s']:,.0f} | {r['ttft_p50_ms']:,.0f} / "
        f"{r['ttft_p99_ms']:,.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['loop_lag_p99_ms']:.2f} | "
        f"{r['failed']} | {r['card']} |"
    )


def sustained(results: list[dict], via: str) -> float | None:
    """The highest finite rate whose TTFT p99 stayed under :data:`TTFT_SLO_S` (None if none did)."""
    ok = [r["rate"] for r in results if r["via"] == via and not math.isinf(r["rate"])
          and r["ttft_p99_ms"] < TTFT_SLO_S * 1e3 and not r["failed"]]  # fmt: skip
    return max(ok) if ok else None


def report(results: list[dict]) -> str:
    lines = [HEADER, *(_row(r) for r in results), ""]
    for via in dict.fromkeys(r["via"] for r in results):
        best = sustained(results, via)
        lines.append(f"- {via}: highest rate with TTFT p99 under {TTFT_SLO_S:g} s: "
                     + (f"{best:g} req/s" if best is not None else "none of those tried"))  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """TTFT and ITL percentiles against the request rate, one line per path and percentile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in results if not math.isinf(r["rate"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "itl", "inter-token latency")):
        for via in dict.fromkeys(r["via"] for r in finite):
            rows = sorted((r for r in finite if r["via"] == via), key=lambda r: r["rate"])
            rates = [r["rate"] for r in rows]
            for q, style in (("p50", "-o"), ("p99", "--o")):
                ax.plot(rates, [r[f"{metric}_{q}_ms"] for r in rows], style, label=f"{via} {q}")
        ax.set_xscale("log")
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    card = results[0]["card"] if results else ""
    fig.suptitle(f"W-serve ({results[0]['model'] if results else ''}), {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="2,4,8,16,inf", help="requests per second, comma-separated; inf = all at once")
    ap.add_argument("--via", default="engine,http", help="engine, http, or both")
    ap.add_argument("--scale", type=float, default=1.0, help="share of W-share's 1,000 requests")
    ap.add_argument("--model", help="override the workload's model (tiny: a CPU smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument(
        "--config", default="", help="EngineConfig overrides, e.g. mixed_graphs=true,prefill_chunk_tokens=512"
    )
    ap.add_argument("--stream-interval", type=int, default=1, help="the server's tokens per streamed write (http)")
    ap.add_argument("--api-processes", type=int, default=0,
                    help="http: the server in this many processes of its own (acb serve --api-processes); 0: in the "
                    "engine's process")  # fmt: skip
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--plot", help="write the TTFT/ITL-against-rate figure to this PNG")
    args = ap.parse_args(argv)
    if not set(args.via.split(",")) <= {"engine", "http"}:
        ap.error("--via takes engine, http or both")
    import acb

    results = acb.run(serve_bench(args))
    text = report(results)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `python -m bench.serve {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n{text}\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
