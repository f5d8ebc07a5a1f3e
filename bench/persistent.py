"""A decode step's work between two attentions, per layer: one op per kernel (the lean path's decode without the
persistent kernel) against :mod:`acb.kernels.persistent`, each with every layer of a model shape in one CUDA graph
(weights of their own per layer, so none is served from L2), against the layer's weight-reading floor::

    python -m bench.persistent --model llama-1b --rows 32              # per-op vs the persistent kernel's default
    python -m bench.persistent --model llama-1b --rows 32 --sweep      # and every tuning of SWEEP
    python -m bench.persistent --model gemma3-1b,qwen3-1.7b --json out.json
    python -m bench.persistent --model llama-1b --trace                # when each phase's tasks wait and work

Each persistent variant is first checked against the per-op ops on the first layer: bf16, every output within 10 %
of its largest value (a wrong tile or split is off by the value itself; tests/gpu/test_kernels.py holds the kernel to
a few ulps).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from acb.kernels import persistent as P
from acb.kernels.persistent import TUNING, Tuning, between_attentions, new_counters

from .run import copy_bandwidth
from .workloads import FAMILY_MODELS

# Session 17 (H200) timed K per tile 128 and 256, 3 to 7 stages, one and two programs per SM, an L2 prefetch of each
# task's weights: 128, 5 stages, one program per SM and no prefetch were best. Session 18 timed a first weight tile
# loaded before the wait (much slower), an acquiring spin, gate and up in two loops (no faster) and stream-K shares
# (slower): docs/benchmarks.md.
SWEEP = [Tuning(stages=st, stages_one=s1) for st, s1 in ((4, 4), (5, 5), (4, 8), (5, 8), (5, 6))]
REPLAYS = 20


def shapes(model: str) -> dict:
    """The layer shape of one of ``FAMILY_MODELS``: sizes, and the family's variants (Gemma's sandwich norms and
    GELU, Qwen2's Q/K/V bias)."""
    import transformers

    cls, fields = FAMILY_MODELS[model]
    cfg = getattr(transformers, cls)(**fields)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return dict(
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, inter=cfg.intermediate_size, dq=heads * dim,
        nqkv=(heads + 2 * kv) * dim, gemma="gemma" in cfg.model_type, bias=cls == "Qwen2Config",
    )  # fmt: skip


def layer_weights(s: dict, dev: str) -> list[dict]:
    torch.manual_seed(0)
    b = dict(device=dev, dtype=torch.bfloat16)

    def w(n, k):
        return torch.randn(n, k, **b) / k**0.5

    def norm():
        return torch.rand(s["hidden"], **b) + 0.5

    return [
        dict(o_w=w(s["hidden"], s["dq"]), ln2=norm(), gate_up_w=w(2 * s["inter"], s["hidden"]),
             down_w=w(s["hidden"], s["inter"]), ln1=norm(), qkv_w=w(s["nqkv"], s["hidden"]),
             qkv_b=torch.randn(s["nqkv"], **b) if s["bias"] else None,
             post_attn_norm=norm() if s["gemma"] else None, post_mlp_norm=norm() if s["gemma"] else None)
        for _ in range(s["layers"])
    ]  # fmt: skip


def per_op(o, residual, lw, act, eps):
    """The lean path's per-op decode between attentions (LeanCausalLM.after_attention, then before_attention)."""
    from acb.kernels.fused import add_rmsnorm, gate_up_act

    x2 = add_rmsnorm(F.linear(o, lw["o_w"]), residual, lw["ln2"], eps, lw["post_attn_norm"])
    h = F.linear(gate_up_act(x2, lw["gate_up_w"], act), lw["down_w"])
    x1 = add_rmsnorm(h, residual, lw["ln1"], eps, lw["post_mlp_norm"])
    return x1, F.linear(x1, lw["qkv_w"], lw["qkv_b"])


def persistent(o, residual, lw, act, eps, counters, tuning, trace=None):
    return between_attentions(
        residual=residual, norm_w=lw["ln1"], eps=eps, counters=counters, o=o, o_w=lw["o_w"], ln2=lw["ln2"],
        gate_up_w=lw["gate_up_w"], down_w=lw["down_w"], post_attn_norm=lw["post_attn_norm"],
        post_mlp_norm=lw["post_mlp_norm"], activation=act, qkv_w=lw["qkv_w"], qkv_b=lw["qkv_b"], tuning=tuning,
        trace=trace,
    )  # fmt: skip


def phase_sizes(s: dict, rows: int, programs: int, tuning: Tuning) -> list[tuple[str, int]]:
    """The kernel's phases in task order, with their task counts (as :func:`between_attentions` splits them)."""
    bk, cdiv = tuning.block_k, lambda a, b: -(-a // b)
    tiles_h, n = cdiv(s["hidden"], P.BLOCK_N), P.BLOCK_N
    s_a = P._splits(tiles_h, s["dq"], bk, programs)[0]
    s_d = P._splits(tiles_h, s["inter"], bk, programs)[0]
    s_f = P._splits(cdiv(s["nqkv"], n), s["hidden"], bk, programs)[0]
    return [("A o-proj", tiles_h * s_a), ("B add+norm", rows), ("C gate/up+act", cdiv(s["inter"], n)),
            ("D down", tiles_h * s_d), ("E add+norm", rows), ("F q/k/v", cdiv(s["nqkv"], n) * s_f)]  # fmt: skip


def phases(trace: torch.Tensor, sizes: list[tuple[str, int]]) -> list[dict]:
    """Per phase, from a launch's ``trace`` (``between_attentions(trace=...)``), µs from the launch's first task:
    when its first task started, when the first and last of its waits ended, the median wait and work (after the
    wait) of its tasks, the longest work, and when its last task ended."""
    rec = trace.reshape(-1, 4).cpu()
    rec = rec[rec[:, 0] >= 0].double()
    t0 = rec[:, 1].min()
    out, lo = [], 0
    for name, n in sizes:
        r = rec[(rec[:, 0] >= lo) & (rec[:, 0] < lo + n)]
        lo += n
        if not len(r):
            continue
        us = (r[:, 1:] - t0) / 1e3
        wait, work = us[:, 1] - us[:, 0], us[:, 2] - us[:, 1]
        out.append(dict(phase=name, tasks=len(r), start=us[:, 0].min().item(), first_go=us[:, 1].min().item(),
                        last_go=us[:, 1].max().item(), wait_p50=wait.median().item(), work_p50=work.median().item(),
                        work_max=work.max().item(), end=us[:, 2].max().item()))  # fmt: skip
    return out


def trace_table(model: str, tuning: Tuning, rows: list[dict]) -> str:
    lines = [f"{model}, {tuning} (µs from the launch's first task)",
             "| phase | tasks | first start | first go | last go | wait p50 | work p50 | work max | last end |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['phase']} | {r['tasks']} | {r['start']:.2f} | {r['first_go']:.2f} | {r['last_go']:.2f} | "
                     f"{r['wait_p50']:.2f} | {r['work_p50']:.2f} | {r['work_max']:.2f} | {r['end']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def time_layers(fn, layers: list[dict]) -> float:
    """µs per layer of ``fn(layer)`` over every layer, in one CUDA graph (median of REPLAYS replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for lw in layers[:2]:
            fn(lw)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for lw in layers:
            fn(lw)
    g.replay()
    times = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(layers))
    return sorted(times)[len(times) // 2]


def measure(model: str, rows: int, tunings: list[Tuning], bandwidth: float, trace: bool = False) -> list[dict]:
    s = shapes(model)
    layers = layer_weights(s, "cuda")
    act, eps = ("gelu_tanh" if s["gemma"] else "silu"), 1e-6
    o = torch.randn(rows, s["dq"], device="cuda", dtype=torch.bfloat16)
    base = torch.randn(rows, s["hidden"], device="cuda", dtype=torch.bfloat16)
    res = base.clone()
    counters = new_counters(torch.device("cuda"))
    weight_bytes = sum(t.numel() * t.element_size() for k, t in layers[0].items() if t is not None and k.endswith("_w"))
    floor_us = weight_bytes / bandwidth * 1e6
    want = per_op(o, base.clone(), layers[0], act, eps)
    out = [dict(model=model, rows=rows, variant="per-op", us=time_layers(lambda lw: per_op(o, res, lw, act, eps),
                                                                        layers), floor_us=floor_us)]  # fmt: skip
    for tuning in tunings:
        got = persistent(o, base.clone(), layers[0], act, eps, counters, tuning)
        for x, y in zip(got, want):
            err = (x.float() - y.float()).abs().max().item()
            if err > 0.1 * max(1.0, y.float().abs().max().item()):
                raise AssertionError(f"{model} {tuning}: persistent differs from per-op by {err}")
        us = time_layers(lambda lw, t=tuning: persistent(o, res, lw, act, eps, counters, t), layers)
        out.append(dict(model=model, rows=rows, variant=str(tuning), us=us, floor_us=floor_us))
        if trace:  # the last layer's launch, in the same graph of every layer
            programs = P._sms(torch.device("cuda")) * tuning.per_sm
            sizes = phase_sizes(s, rows, programs, tuning)
            buf = torch.full((programs, -(-sum(n for _, n in sizes) // programs), 4), -1, dtype=torch.int64,
                             device="cuda")  # fmt: skip
            time_layers(lambda lw, t=tuning, b=buf: persistent(o, res, lw, act, eps, counters, t, b), layers)
            out[-1]["phases"] = phases(buf, sizes)
            print(trace_table(model, tuning, out[-1]["phases"]), file=sys.stderr, flush=True)
        print(
            f"{model} {rows} {tuning}: {us:.1f} µs per layer (per-op {out[0]['us']:.1f})", file=sys.stderr, flush=True
        )
    return out


def table(results: list[dict], card: str) -> str:
    lines = ["| model | rows | variant | µs per layer | floor µs | / floor | card |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['rows']} | {r['variant']} | {r['us']:.1f} | {r['floor_us']:.1f} | "
                     f"{r['us'] / r['floor_us']:.2f}× | {card} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", help="comma-separated names of bench.workloads.FAMILY_MODELS")
    ap.add_argument("--rows", default="32", help="comma-separated row counts (at most PERSISTENT_ROWS)")
    ap.add_argument("--sweep", action="store_true", help="time every tuning of SWEEP, not only the default")
    ap.add_argument("--trace", action="store_true", help="and when each phase's tasks wait and work (last layer)")
    ap.add_argument("--tunings", help="Python expressions of Tuning(...) to time instead, ';'-separated")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    tunings = SWEEP if args.sweep else [TUNING]
    if args.tunings:  # "Tuning(...)" expressions, nothing else in reach
        tunings = [eval(t, {"__builtins__": {}, "Tuning": Tuning}) for t in args.tunings.split(";")]
    results = []
    for model, rows in itertools.product(args.model.split(","), [int(r) for r in args.rows.split(",")]):
        results += measure(model, rows, tunings, bandwidth, args.trace)
        print(table(results[-1:], card), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(card=card, copy_bw_GBps=bandwidth / 1e9, results=results), f, indent=2)
    print(table(results, card))


if __name__ == "__main__":
    main()
