"""Decode GEMMs against their weight-reading floor: cuBLAS (``F.linear``) and a split-K Triton kernel for skinny
products (:mod:`bench.skinny`, a candidate the engine does not use), per projection of a model shape and batch size.

A decode step's projections read every weight once for a handful of rows, so each should run at the card's copy
bandwidth. On an H200, W-share's decode steps of <= 32 rows took 5.4 ms of GPU against 3.8 ms of weight reading
(docs/benchmarks.md), and ~60 % of the GPU time went to cuBLAS's skinny GEMM kernels. This measures each GEMM alone,
inside a CUDA graph, cycling through enough copies of the weight that none is served from L2. ``skinny_linear`` runs
its own pick (``bench.skinny.pick``) and every configuration of :func:`candidates`, each first checked against
``F.linear`` in fp32 (bf16 results within rounding) and against itself (bit-equal twice)::

    python -m bench.gemm --model llama-8b --rows 1,8,32,64,128,256 --json out.json
    python -m bench.gemm --model llama-8b --tp 2 ...     # one rank's shapes at TP=2 (half-width projections)
    python -m bench.gemm --blas cublas,cublaslt,cublas-fullred --no-candidate   # torch's BLAS back ends
    python -m bench.gemm --mlp --model llama-8b --rows 4,32,64,96,128            # the MLP's up half, two ways

``--blas`` times ``torch.matmul`` under each of torch's settings that change which cuBLAS kernel runs: ``cublas``
(the default), ``cublaslt`` (``torch.backends.cuda.preferred_blas_library``: cuBLASLt's own heuristic) and
``cublas-fullred`` (``allow_bf16_reduced_precision_reduction`` off, which rules out split-K reductions in bf16).

``--mlp`` times the MLP's gate/up projection with its activation as the lean path runs it
(``acb.kernels.fused.gate_up_act``, one Triton kernel, up to ``GATE_UP_ROWS`` rows) against cuBLAS gate/up followed
by ``silu_mul`` (what it replaced), each after a check that both give the same values.

"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .run import copy_bandwidth
from .skinny import LINEAR_ROWS, pick, skinny_linear

CALLS = 32  # calls per graph replay, cycling through the weight copies
SPLITS = (1, 2, 3, 4, 6, 8)


def candidates(rows: int) -> list:
    """``skinny_linear``'s configurations tried at ``rows``: (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, SWAP), every
    split of each compiled tile (the split is a run-time argument: it compiles nothing)."""
    tiles = []
    if rows > 64:
        for bn, bk, warps, stages in [(128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4),
                                      (64, 128, 4, 4), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 6)]:  # fmt: skip
            tiles.append((bn, bk, warps, stages, False))
    else:
        for bn, bk, warps, stages in [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (32, 256, 4, 3)]:
            tiles.append((bn, bk, warps, stages, False))
        for bn, bk, warps, stages in [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (128, 64, 4, 5)]:
            tiles.append((bn, bk, warps, stages, True))
    return [(bn, bk, split, w, st, swap) for bn, bk, w, st, swap in tiles for split in SPLITS]


def projections(model: str, tp: int = 1) -> dict[str, tuple[int, int]]:
    """``{name: (N, K)}`` of a decode step's projections, as the lean path fuses them (Q/K/V and gate/up), on one
    rank of ``tp``: column-parallel ones (Q/K/V, gate/up, the LM head) keep ``N / tp`` rows of weights, row-parallel
    ones (O, down) ``K / tp`` columns."""
    from .workloads import build_model

    cfg = build_model(model, device="meta").config
    hidden, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or hidden // heads
    return {
        "qkv": ((heads + 2 * kv) * dim // tp, hidden),
        "o": (hidden, heads * dim // tp),
        "gate_up": (2 * cfg.intermediate_size // tp, hidden),
        "down": (hidden, cfg.intermediate_size // tp),
        "lm_head": (-(-cfg.vocab_size // tp), hidden),
    }


def _time(fn, calls: int) -> float:
    """µs per call of ``fn(i)`` for i in range(calls), captured in one CUDA graph (median of 5 replays)."""
    for i in range(calls):
        fn(i)  # compile and warm
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return sorted(times)[2]


BLAS = ("cublas", "cublaslt", "cublas-fullred")


class _blas:
    """Within the block, torch's matmuls take the BLAS setting ``name`` (one of :data:`BLAS`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self.saved = torch.backends.cuda.preferred_blas_library(), m.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.preferred_blas_library("cublaslt" if self.name == "cublaslt" else "cublas")
        m.allow_bf16_reduced_precision_reduction = self.name != "cublas-fullred" and self.saved[1]

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.preferred_blas_library(self.saved[0])
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self.saved[1]


def measure(
    model: str,
    rows: list[int],
    bandwidth: float,
    tp: int = 1,
    blas: tuple[str, ...] = (),
    candidate: bool = True,
    only: tuple[str, ...] = (),
) -> list[dict]:
    results = []
    for name, (n, k) in projections(model, tp).items():
        if only and name not in only:
            continue
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))  # > 256 MiB in all: L2 (50-60 MB) never holds the next one
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in rows:
            row = {"model": model, "tp": tp, "proj": name, "N": n, "K": k, "rows": m,
                   "floor_us": n * k * 2 / bandwidth * 1e6}  # fmt: skip
            row.update(_shape(weights, m, blas, candidate))
            results.append(row)
            line = f"{name} {n}x{k} rows {m}: floor {row['floor_us']:.1f} µs, cuBLAS {row['cublas_us']:.1f}"
            line += "".join(f", {b} {us:.1f}" for b, us in row.get("blas_us", {}).items())
            if "triton_us" in row:
                line += f", skinny_linear best {row['triton_us']:.1f} {row['triton_config']}"
                line += f", picked {row['picked_us']:.1f} {row['picked_config']}"
            print(line, file=sys.stderr, flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    return results


def _shape(weights: list[torch.Tensor], m: int, blas: tuple[str, ...] = (), candidate: bool = True) -> dict:
    """cuBLAS (and under each ``blas`` setting), and the candidate's best configuration (checked first) for up to 64
    rows, on ``m`` rows of input."""
    n, k = weights[0].shape
    copies = len(weights)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

    def matmul(i: int) -> torch.Tensor:
        return torch.matmul(x, weights[i % copies].t(), out=y)

    out = {"cublas_us": _time(matmul, CALLS)}
    if blas:
        out["blas_us"] = {}
        for name in blas:
            with _blas(name):
                out["blas_us"][name] = _time(matmul, CALLS)
    if m > LINEAR_ROWS or not candidate:
        return out
    ref = torch.nn.functional.linear(x.float(), weights[0].float())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tried = []
    for cfg in [None] + candidates(m):
        got = skinny_linear(x, weights[0], config=cfg)
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        if err > 1e-2 or not torch.equal(got, skinny_linear(x, weights[0], config=cfg)):
            raise AssertionError(f"skinny_linear {cfg} wrong or not deterministic for {n} x {k}, {m} rows: {err:.2e}")
        us = _time(lambda i, c=cfg: skinny_linear(x, weights[i % copies], config=c), CALLS)
        tried.append((us, list(cfg or pick(m, n, k, sms))))
        if cfg is None:
            out["picked_us"], out["picked_config"] = us, tried[-1][1]
    tried.sort()
    out.update(triton_us=tried[0][0], triton_config=tried[0][1], top=tried[:5])
    return out


def measure_mlp(model: str, rows: list[int], bandwidth: float, tp: int = 1) -> list[dict]:
    """Per row count: cuBLAS gate/up alone, cuBLAS gate/up + ``silu_mul``, and ``gate_up_act`` (µs)."""
    n, k = projections(model, tp)["gate_up"]
    copies = max(2, -(-256 * 2**20 // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    return [
        {"model": model, "tp": tp, "N": n, "K": k, "rows": m, "floor_us": n * k * 2 / bandwidth * 1e6}
        | _mlp_shape(weights, m)
        for m in rows
    ]


def _mlp_shape(weights: list[torch.Tensor], m: int) -> dict:
    from acb.kernels.fused import GATE_UP_ROWS, gate_up_act, silu_mul

    n, k = weights[0].shape
    copies = len(weights)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    out = {
        "cublas_us": _time(lambda i: torch.matmul(x, weights[i % copies].t(), out=y), CALLS),
        "cublas_silu_us": _time(lambda i: silu_mul(torch.matmul(x, weights[i % copies].t(), out=y)), CALLS),
    }
    if m <= GATE_UP_ROWS:
        ref = silu_mul(x @ weights[0].t()).float()
        err = ((gate_up_act(x, weights[0]).float() - ref).abs().max() / ref.abs().max()).item()
        if err > 1e-2:
            raise AssertionError(f"gate_up_act wrong for {n} x {k}, {m} rows: relative error {err:.2e}")
        out["fused_us"] = _time(lambda i: gate_up_act(x, weights[i % copies]), CALLS)
    return out


def mlp_table(results: list[dict], card: str) -> str:
    lines = [
        "| gate/up (N x K) | rows | floor µs | cuBLAS gate/up µs | cuBLAS + silu_mul µs | gate_up_act µs | saved µs "
        "| card |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fused = r.get("fused_us")
        cells = "— | —" if fused is None else f"{fused:.1f} | {r['cublas_silu_us'] - fused:.1f}"
        lines.append(
            f"| {r['N']} x {r['K']} | {r['rows']} | {r['floor_us']:.1f} | {r['cublas_us']:.1f} | "
            f"{r['cublas_silu_us']:.1f} | {cells} | {card} |"
        )
    return "\n".join(lines)


def table(results: list[dict], card: str) -> str:
    blas = list(results[0].get("blas_us", {})) if results else []
    lines = [
        "| projection (N x K) | TP | rows | floor µs | cuBLAS µs | cuBLAS / floor | "
        + "".join(f"{b} µs | " for b in blas)
        + "skinny_linear µs (its pick) | best configuration µs | best / floor | card |",
        "|---|---|---|---|---|---|" + "---|" * len(blas) + "---|---|---|---|",
    ]
    for r in results:
        t = r.get("triton_us")
        tri = "— | — | —"
        if t is not None:
            tri = f"{r['picked_us']:.1f} | {t:.1f} {tuple(r['triton_config'])} | {t / r['floor_us']:.2f}×"
        alt = "".join(f"{r['blas_us'][b]:.1f} | " for b in blas)
        lines.append(
            f"| {r['proj']} ({r['N']} x {r['K']}) | {r['tp']} | {r['rows']} | {r['floor_us']:.1f} | "
            f"{r['cublas_us']:.1f} | {r['cublas_us'] / r['floor_us']:.2f}× | {alt}{tri} | {card} |"
        )
    return "\n".join(lines)


def card_and_bandwidth(ap: argparse.ArgumentParser) -> tuple[str, float]:
    """For a single-GPU micro-benchmark: the card's name and its copy bandwidth in bytes/s (printed to stderr), or
    ``ap``'s usage error without CUDA."""
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{card}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", file=sys.stderr)
    return card, bandwidth


def write_json(path: str | None, card: str, bandwidth: float, results: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"card": card, "copy_bw_GBps": bandwidth / 1e9, "results": results}, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--rows", default="1,8,32,64,128,256")
    ap.add_argument("--tp", type=int, default=1, help="one rank's share of each projection at this tensor parallelism")
    ap.add_argument("--blas", default="", help=f"comma-separated, of {', '.join(BLAS)}: also time cuBLAS under each")
    ap.add_argument("--no-candidate", action="store_true", help="skip skinny_linear (cuBLAS only)")
    ap.add_argument("--mlp", action="store_true", help="time gate/up + activation: acb's fused kernel and cuBLAS")
    ap.add_argument("--proj", default="", help="comma-separated projections to time (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    blas = tuple(b for b in args.blas.split(",") if b)
    if any(b not in BLAS for b in blas):
        ap.error(f"--blas takes {', '.join(BLAS)}")
    card, bandwidth = card_and_bandwidth(ap)
    rows = [int(r) for r in args.rows.split(",")]
    if args.mlp:
        results = measure_mlp(args.model, rows, bandwidth, args.tp)
        write_json(args.json, card, bandwidth, results)
        print(mlp_table(results, card))
        return
    only = tuple(p for p in args.proj.split(",") if p)
    results = measure(args.model, rows, bandwidth, args.tp, blas, not args.no_candidate, only)
    write_json(args.json, card, bandwidth, results)
    print(table(results, card))


if __name__ == "__main__":
    main()
