"""Does asking L2 for a projection's weights one kernel early shorten a decode step's GEMMs? (acb.kernels.prefetch)

Per projection of a model at a decode batch, one CUDA graph runs ``calls`` pairs of (the residual add + RMSNorm
kernel, the projection), each pair on weights of its own (cycled past L2, as a decode step's are), and times one
pair. Variants, in one run:

- ``off``: the norm asks for nothing (what the engine does without prefetching);
- ``lines`` / ``bulk``: the norm asks L2 for the projection's weights (per 128-byte line, or per 16 KB chunk with
  Hopper's bulk prefetch) as it starts;
- ``ahead``: the norm asks for the *next* pair's weights (bulk), one pair ahead;
- ``hot``: every pair reads the same weights, which stay in L2: what a perfect prefetch could give.

Each variant is first checked against the ``off`` output (same values: a prefetch changes no arithmetic)::

    python -m bench.prefetch --model llama-1b,gemma3-1b --rows 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from acb.kernels import fused
from acb.kernels import prefetch as pf

from .gemm import projections

VARIANTS = ("off", "lines", "bulk", "ahead", "hot")
L2_CYCLE = 256 << 20  # bytes of weights one graph cycles through: several times an H200's 50 MB of L2


def _graph_us(fn, calls: int, replays: int = 7) -> float:
    """µs per call of ``fn(i)``, i in range(calls), captured in one CUDA graph: median over replays, timed by
    events."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def measure(model: str, rows: int, names: list[str]) -> list[dict]:
    out = []
    for name, (n, k) in projections(model).items():
        if name in names:
            out.append(_projection(model, name, n, k, rows))
            print(json.dumps(out[-1]), flush=True)
            torch.cuda.empty_cache()
    return out


def _projection(model: str, name: str, n: int, k: int, rows: int) -> dict:
    dev = torch.device("cuda")
    nbytes = n * k * 2
    calls = max(8, -(-L2_CYCLE // nbytes))
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(calls)]
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    res = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    nw = torch.ones(k, device=dev, dtype=torch.bfloat16)

    def pair(variant):
        def fn(i):
            w = ws[0] if variant == "hot" else ws[i]
            ahead = ws[(i + 1) % calls] if variant == "ahead" else w
            normed = fused.add_rmsnorm(x, res, nw, 1e-6, prefetch=None if variant in ("off", "hot") else ahead)
            return fused.gate_up_act(normed, w) if name == "gate_up" else F.linear(normed, w)

        return fn

    row = {"model": model, "proj": name, "n": n, "k": k, "rows": rows, "mb": nbytes / 1e6, "calls": calls}
    res0 = res.clone()
    ref = None
    for variant in VARIANTS:
        pf.MODE = {"off": 0, "hot": 0, "lines": 1}.get(variant, 2)
        res.copy_(res0)
        got = pair(variant)(0)
        ref = got if variant == "off" else ref
        row[f"{variant}_ok"] = bool(torch.equal(got, ref))  # the same arithmetic, whatever was prefetched
        row[variant] = round(_graph_us(pair(variant), calls), 2)
    pf.MODE = 0
    row["norm_alone"] = round(_graph_us(lambda i: fused.add_rmsnorm(x, res, nw, 1e-6), calls), 2)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b,gemma3-1b")
    ap.add_argument("--rows", default="32")
    ap.add_argument("--proj", default="qkv,o,gate_up,down")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.time()
    results = []
    for model in args.model.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            results += measure(model, rows, args.proj.split(","))
    print(f"{'model':12} {'proj':8} {'rows':>4} {'MB':>6} " + " ".join(f"{v:>7}" for v in VARIANTS) + "  norm")
    for r in results:
        cells = " ".join(f"{r[v]:7.2f}" + ("" if r[f"{v}_ok"] else "!") for v in VARIANTS)
        print(f"{r['model']:12} {r['proj']:8} {r['rows']:4d} {r['mb']:6.1f} {cells}  {r['norm_alone']:.2f}")
    print(f"({time.time() - t0:.0f} s; µs per norm + projection pair in a CUDA graph; ! = output differs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
