"""Decode GEMMs against their weight-reading floor: cuBLAS (``F.linear``, what the lean path runs) and a candidate
Triton split-K kernel for skinny products, per projection of a model shape and per batch size.

A decode step's projections read every weight once for a handful of rows, so each should run at the card's copy
bandwidth. On an H200, W-share's decode steps of <= 32 rows took 5.4 ms of GPU against 3.8 ms of weight reading
(docs/benchmarks.md), and ~60 % of the GPU time went to cuBLAS's skinny GEMM kernels. This measures each GEMM alone,
inside a CUDA graph, cycling through enough copies of the weight that none is served from L2, and first checks the
candidate against ``F.linear`` (fp32 accumulation; bf16 results within rounding)::

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

The candidate (``skinny_linear``) is an experiment, not used by the engine: it moves into ``acb/kernels`` only if
this table shows it beating cuBLAS where decode steps spend their time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton
import triton.language as tl

from .run import copy_bandwidth

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): the candidate's configurations, all tried per shape
CONFIGS = [
    (64, 128, 1, 4, 4),
    (64, 128, 2, 4, 4),
    (64, 128, 4, 4, 4),
    (32, 256, 2, 4, 3),
    (128, 64, 1, 4, 5),
    (128, 128, 2, 8, 3),
    (32, 128, 4, 4, 4),
]
CALLS = 32  # calls per graph replay, cycling through the weight copies


@triton.jit
def _skinny_kernel(
    X, W, Y, M, N, K, s_xm, s_wn, s_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """Y[M, N] (+)= X[M, K] @ W[N, K]^T over this program's share of K (every SPLIT_K-th block of BLOCK_K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * s_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(W + rn[:, None] * s_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ptr = Y + rm[:, None] * s_ym + rn[None, :]
    if SPLIT_K == 1:
        tl.store(ptr, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptr, acc, mask=mask)


def skinny_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    config=CONFIGS[0],
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w.T`` in ``x``'s dtype, for a few rows of ``x`` (at most 64). With split-K the programs add their
    partial sums into a float32 ``workspace`` (zeroed here), which is then copied into ``out``: three kernels, all
    counted when the bench times it against cuBLAS."""
    block_n, block_k, split_k, warps, stages = config
    m, k = x.shape
    n = w.shape[0]
    if m > 64:
        raise ValueError("skinny_linear is for at most 64 rows")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out
    if split_k > 1:
        target = workspace if workspace is not None else torch.empty(m, n, dtype=torch.float32, device=x.device)
        target.zero_()
    grid = (triton.cdiv(n, block_n), split_k)
    _skinny_kernel[grid](
        x, w, target, m, n, k, x.stride(0), w.stride(0), target.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split_k > 1:
        out.copy_(target)
    return out


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
    model: str, rows: list[int], bandwidth: float, tp: int = 1, blas: tuple[str, ...] = (), candidate: bool = True
) -> list[dict]:
    results = []
    for name, (n, k) in projections(model, tp).items():
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
                line += f", triton {row['triton_us']:7.1f} {row['triton_config']}"
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
    if m > 64 or not candidate:
        return out
    ref = x.float() @ weights[0].float().t()
    best = None
    for cfg in CONFIGS:
        got = skinny_linear(x, weights[0], cfg).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        if err > 1e-2:
            raise AssertionError(f"skinny_linear {cfg} wrong for {n} x {k}, {m} rows: relative error {err:.2e}")
        acc = torch.empty(m, n, device="cuda", dtype=torch.float32)
        us = _time(lambda i, c=cfg, a=acc: skinny_linear(x, weights[i % copies], c, out=y, workspace=a), CALLS)
        if best is None or us < best[1]:
            best = (cfg, us)
    out.update(triton_us=best[1], triton_config=list(best[0]))
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
        + "Triton split-K µs | Triton / floor | card |",
        "|---|---|---|---|---|---|" + "---|" * len(blas) + "---|---|---|",
    ]
    for r in results:
        t = r.get("triton_us")
        tri = f"{t:.1f} | {t / r['floor_us']:.2f}×" if t is not None else "— | —"
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
    ap.add_argument("--no-candidate", action="store_true", help="skip the Triton split-K candidate")
    ap.add_argument("--mlp", action="store_true", help="time gate/up + activation: acb's fused kernel and cuBLAS")
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
    results = measure(args.model, rows, bandwidth, args.tp, blas, not args.no_candidate)
    write_json(args.json, card, bandwidth, results)
    print(table(results, card))


if __name__ == "__main__":
    main()
