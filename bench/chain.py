"""A decode step's chain of kernels, layer after layer, against its weight-reading floor: does the time between
kernels shrink with Triton GEMMs that prefetch their weights under programmatic dependent launch (PDL)?

``bench.gemm`` times each projection alone; a decode step is 32 layers of them back to back, and on the card the
step takes ~1.4x what its projections take alone (docs/benchmarks.md). Each small kernel pays a launch, a ramp-up
and a tail during which the memory bus is idle. Under PDL (Hopper) a kernel may start while its predecessor still
runs: it loads weight tiles (which no earlier kernel writes), then waits (``gdc_wait``) for its predecessor's
output. The chain per layer, captured in one CUDA graph over the model's 32 layers::

    add_rmsnorm -> qkv -> o (on the q columns) -> add_rmsnorm -> gate_up -> silu_mul -> down

Variants, same weights, same graph shape:

- ``cublas``: ``F.linear`` and acb's Triton norm and SiLU kernels (what the lean path runs today);
- ``triton``: the same with :func:`dense` for the projections, PDL off;
- ``triton+pdl``: every kernel launched with PDL, each GEMM loading its first weight tile before it waits and
  letting the next kernel launch at once;
- ``triton+pdl-late``: the same, but a GEMM lets the next kernel launch only after its main loop (programs of the
  next kernel that wait early hold SM slots the GEMM's last waves need: at TP=1, 32 rows, ``triton+pdl`` lost 2 %);
- ``fused+pdl``: the residual add and RMSNorm folded into the Q/K/V and gate/up GEMMs, SiLU·mul into the gate/up
  GEMM's epilogue (7 kernels per layer become 4), with PDL.

Each variant's chain output is checked against ``cublas``'s first. ``python -m bench.chain --tp 1,2 --rows 8,32
[--variants cublas,triton,...]``; results of the first run (H100): docs/benchmarks.md.
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

EPS = 1e-5


@triton.jit
def _operand(X, R, G, rm, mm, kk, s_x, s_r, inv, NORM: tl.constexpr, RES: tl.constexpr):
    """Rows ``rm`` of X at columns ``kk``; with NORM, add_rmsnorm's result there (``inv``: each row's 1 / RMS)."""
    x = tl.load(X + rm[:, None] * s_x + kk[None, :], mask=mm, other=0.0)
    if NORM:
        xf = x.to(tl.float32)
        if RES:
            xf += tl.load(R + rm[:, None] * s_r + kk[None, :], mask=mm, other=0.0).to(tl.float32)
        g = tl.load(G + kk)
        x = ((xf * inv[:, None]).to(g.dtype) * g[None, :]).to(x.dtype)  # add_rmsnorm's roundings
    return x


@triton.jit
def _dense_kernel(
    X, R, ROUT, G, W, Y, WS, LOCK, M, N, K, s_x, s_r, s_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    NORM: tl.constexpr, RES: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """``Y[M, N] = f(X) @ W[N, K]^T`` for a few rows. ``NORM``: f is RMSNorm with weight G, over ``X + R`` when
    ``RES`` (the sum, the new residual, is written to ROUT by the first program). ``GATED``: W is ``[2N, K]`` (gate
    rows, then up rows) and Y = silu(f(X) @ Wg^T) * (f(X) @ Wu^T). ``SPLIT_K`` > 1: each program sums one share
    of K into the fp32 workspace WS; the last program of an N block to arrive (counted in LOCK, which it resets)
    adds the shares in order, so the result does not depend on which program finished first."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm[:, None] < M
    nm = rn[:, None] < N
    k_share = K // SPLIT_K
    k_lo = pid_k * k_share
    w_ptr = W + rn[:, None].to(tl.int64) * K + k_lo + rk[None, :]
    # the first weight tile does not depend on earlier kernels: load it before waiting for them
    w = tl.load(w_ptr, mask=nm, other=0.0)
    if GATED:
        u = tl.load(w_ptr + N * K, mask=nm, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    inv = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORM:  # the rows' RMS over all of K (X from L2: a few hundred KB)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(X + rm[:, None] * s_x + k0 + rk[None, :], mask=mm, other=0.0).to(tl.float32)
            if RES:
                x += tl.load(R + rm[:, None] * s_r + k0 + rk[None, :], mask=mm, other=0.0).to(tl.float32)
                if (pid_n == 0) & (pid_k == 0):
                    tl.store(ROUT + rm[:, None] * s_r + k0 + rk[None, :], x.to(ROUT.dtype.element_ty), mask=mm)
            ss += tl.sum(x * x, 1)
        inv = tl.rsqrt(ss / K + eps)
    x = _operand(X, R, G, rm, mm, k_lo + rk, s_x, s_r, inv, NORM, RES)
    acc = tl.dot(x, tl.trans(w))
    if GATED:
        acc_u = tl.dot(x, tl.trans(u))
    for k0 in range(k_lo + BLOCK_K, k_lo + k_share, BLOCK_K):
        x = _operand(X, R, G, rm, mm, k0 + rk, s_x, s_r, inv, NORM, RES)
        acc += tl.dot(x, tl.trans(tl.load(w_ptr + (k0 - k_lo), mask=nm, other=0.0)))
        if GATED:
            acc_u += tl.dot(x, tl.trans(tl.load(w_ptr + N * K + (k0 - k_lo), mask=nm, other=0.0)))
    if PDL == 2:  # the main loop is done: the next kernel may start its weight loads
        tl.extra.cuda.gdc_launch_dependents()
    om = mm & (rn[None, :] < N)
    if SPLIT_K == 1:
        _store(Y, acc, acc_u if GATED else acc, rm, rn, om, s_y, GATED)
    else:
        ws = WS + pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(ws, acc, mask=om)
        if GATED:
            tl.store(ws + SPLIT_K * M * N, acc_u, mask=om)
        tl.debug_barrier()
        if tl.atomic_add(LOCK + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:  # the last share of this N block
            tl.store(LOCK + pid_n, 0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):  # in split order, whoever arrived last
                part = WS + s * M * N + rm[:, None] * N + rn[None, :]
                acc += tl.load(part, mask=om, other=0.0, volatile=True)
                if GATED:
                    acc_u += tl.load(part + SPLIT_K * M * N, mask=om, other=0.0, volatile=True)
            _store(Y, acc, acc_u, rm, rn, om, s_y, GATED)


@triton.jit
def _store(Y, acc, acc_u, rm, rn, om, s_y, GATED: tl.constexpr):
    ty = Y.dtype.element_ty
    if GATED:  # silu_mul's roundings: gate and up rounded first, SiLU in fp32, the product in the model dtype
        g = acc.to(ty).to(tl.float32)
        acc = ((g / (1.0 + tl.exp(-g))).to(ty) * acc_u.to(ty)).to(tl.float32)
    tl.store(Y + rm[:, None] * s_y + rn[None, :], acc.to(ty), mask=om)


class Dense:
    """One projection's launch: its weight, its configuration and its scratch (workspace, arrival counters)."""

    def __init__(self, w: torch.Tensor, rows: int, config: tuple, gated: bool = False) -> None:
        self.w, self.gated = w, gated
        self.block_n, self.block_k, self.split_k, self.warps, self.stages = config
        n = w.shape[0] // (2 if gated else 1)
        self.n = n
        parts = self.split_k * (2 if gated else 1)
        self.ws = torch.empty(parts * rows * n if self.split_k > 1 else 1, dtype=torch.float32, device=w.device)
        self.lock = torch.zeros(triton.cdiv(n, self.block_n), dtype=torch.int32, device=w.device)

    def __call__(self, x, out, pdl=0, norm=None, residual=None, residual_out=None):
        """``pdl``: 0 off, 1 launched with PDL and letting the next kernel launch at once, 2 only after its main
        loop."""
        m, k = x.shape
        assert k % (self.block_k * self.split_k) == 0, (k, self.block_k, self.split_k)
        r = residual if residual is not None else x
        grid = (triton.cdiv(self.n, self.block_n), self.split_k)
        _dense_kernel[grid](
            x, r, residual_out if residual_out is not None else r, norm if norm is not None else x, self.w, out,
            self.ws, self.lock, m, self.n, k, x.stride(0), r.stride(0), out.stride(0), EPS,
            BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=self.block_n, BLOCK_K=self.block_k,
            SPLIT_K=self.split_k, NORM=norm is not None, RES=residual is not None, GATED=self.gated, PDL=int(pdl),
            num_warps=self.warps, num_stages=self.stages, launch_pdl=bool(pdl),
        )  # fmt: skip
        return out


@triton.jit
def _norm_kernel(X, R, W, OUT, n, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(R + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(R + row * n + cols, x.to(R.dtype.element_ty), mask=mask)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(OUT + row * n + cols, (y.to(W.dtype.element_ty) * w).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_kernel(GU, OUT, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(GU + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * n + n + cols, mask=mask, other=0.0)
    tl.store(OUT + row * n + cols, (g / (1.0 + tl.exp(-g))).to(u.dtype) * u, mask=mask)


def _norm(x, r, w, out, pdl):
    rows, n = x.shape
    _norm_kernel[(rows,)](x, r, w, out, n, EPS, BLOCK=triton.next_power_of_2(n), PDL=bool(pdl), num_warps=8,
                          launch_pdl=bool(pdl))  # fmt: skip
    return out


def _silu(gu, out, pdl):
    rows, n = out.shape
    _silu_kernel[(rows, triton.cdiv(n, 1024))](gu, out, n, BLOCK=1024, PDL=bool(pdl), launch_pdl=bool(pdl))
    return out


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), tried per projection
CONFIGS = [
    (32, 256, 1, 4, 4),
    (64, 128, 1, 4, 4),
    (64, 256, 1, 4, 3),
    (64, 128, 2, 4, 4),
    (128, 128, 2, 4, 4),
    (128, 128, 4, 4, 4),
    (64, 256, 4, 4, 3),
    (128, 64, 4, 4, 6),
]


def shapes(tp: int) -> dict[str, tuple[int, int]]:
    """llama-8b's per-rank projections at ``tp``: ``{name: (N, K)}`` (gate_up's N counts gate and up rows)."""
    hidden, inter, q, kv = 4096, 14336, 4096, 1024
    return {"qkv": ((q + 2 * kv) // tp, hidden), "o": (hidden, q // tp), "gate_up": (2 * inter // tp, hidden),
            "down": (hidden, inter // tp)}  # fmt: skip


def _time_graph(fn, reps: int = 5) -> float:
    """ms per replay of a CUDA graph of ``fn()`` (median of ``reps``)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[reps // 2]


def pick_configs(layers: list[dict], rows: int) -> dict[str, tuple]:
    """The fastest checked configuration per projection (alone, PDL off, cycling through every layer's copy)."""
    picked = {}
    for name in ("qkv", "o", "gate_up", "down"):
        n, k = layers[0][name].shape
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ layers[0][name].float().t()
        best = None
        for cfg in CONFIGS:
            if k % (cfg[1] * cfg[2]):
                continue
            ops = [Dense(lw[name], rows, cfg) for lw in layers]
            err = ((ops[0](x, y).float() - ref).abs().max() / ref.abs().max()).item()
            if err > 1e-2:
                raise AssertionError(f"dense {cfg} wrong for {name} {n}x{k}: relative error {err:.2e}")

            def run(ops=ops, x=x, y=y):
                for op in ops:
                    op(x, y)

            ms = _time_graph(run)
            if best is None or ms < best[1]:
                best = (cfg, ms)
        ws = [lw[name] for lw in layers]
        cublas = _time_graph(lambda x=x, y=y, ws=ws: [torch.matmul(x, w.t(), out=y) for w in ws])
        picked[name] = best[0]
        print(f"  {name} {n}x{k}: dense {best[1] / len(layers) * 1e3:.1f} µs {best[0]}, cuBLAS "
              f"{cublas / len(layers) * 1e3:.1f} µs", file=sys.stderr)  # fmt: skip
    return picked


def chain(variant: str, layers, gammas, bufs, ops, pdl: int):
    """One decode step's layers (without attention) as ``variant`` runs them; returns the last hidden rows."""
    h, res, normed, qkv, gu, act, h2, res2 = (bufs[k] for k in ("h", "res", "normed", "qkv", "gu", "act", "h2",
                                                                 "res2"))  # fmt: skip
    q_cols = bufs["q_cols"]
    for i, lw in enumerate(layers):
        if variant == "cublas":
            _norm(h, res, gammas[0], normed, False)
            torch.matmul(normed, lw["qkv"].t(), out=qkv)
            torch.matmul(qkv[:, :q_cols], lw["o"].t(), out=h2)
            _norm(h2, res, gammas[1], normed, False)
            torch.matmul(normed, lw["gate_up"].t(), out=gu)
            _silu(gu, act, False)
            torch.matmul(act, lw["down"].t(), out=h)
        elif variant.startswith("triton"):
            o = ops[i]
            _norm(h, res, gammas[0], normed, pdl)
            o["qkv"](normed, qkv, pdl)
            o["o"](qkv[:, :q_cols], h2, pdl)
            _norm(h2, res, gammas[1], normed, pdl)
            o["gate_up"](normed, gu, pdl)
            _silu(gu, act, pdl)
            o["down"](act, h, pdl)
        else:  # fused: residual ping-pongs between res and res2 (the GEMM's programs all read the old one)
            o = ops[i]
            o["qkv"](h, qkv, pdl, norm=gammas[0], residual=res, residual_out=res2)
            o["o"](qkv[:, :q_cols], h2, pdl)
            o["gate_up"](h2, act, pdl, norm=gammas[1], residual=res2, residual_out=res)
            o["down"](act, h, pdl)
    return h


VARIANTS = {  # name: (PDL mode, which launches)
    "cublas": (0, None),
    "triton": (0, "ops"),
    "triton+pdl": (1, "ops"),
    "triton+pdl-late": (2, "ops"),
    "fused": (0, "fused"),
    "fused+pdl": (1, "fused"),
}


def measure(tp: int, rows: int, num_layers: int, bandwidth: float, variants=tuple(VARIANTS)) -> dict:
    dims = shapes(tp)
    torch.manual_seed(0)
    layers = [{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for name, (n, k) in
               dims.items()} for _ in range(num_layers)]  # fmt: skip
    hidden = dims["qkv"][1]
    gammas = [1 + 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    inter = dims["down"][1]
    weight_bytes = sum(t.numel() * 2 for lw in layers for t in lw.values())
    print(f"TP={tp}, {rows} rows, {num_layers} layers: {weight_bytes / 1e9:.2f} GB of weights", file=sys.stderr)
    configs = pick_configs(layers, rows)

    def bufs():
        z = lambda n: torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        return {"h": z(hidden), "res": z(hidden), "res2": z(hidden), "normed": z(hidden), "qkv": z(dims["qkv"][0]),
                "gu": z(dims["gate_up"][0]), "act": z(inter), "h2": z(hidden), "q_cols": dims["o"][1]}  # fmt: skip

    start = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    ops = [{name: Dense(lw[name], rows, configs[name]) for name in dims} for lw in layers]
    fused = [dict(o) for o in ops]
    for i, lw in enumerate(layers):
        fused[i]["gate_up"] = Dense(lw["gate_up"], rows, configs["gate_up"], gated=True)
    out = {"tp": tp, "rows": rows, "layers": num_layers, "weight_GB": weight_bytes / 1e9,
           "floor_ms": weight_bytes / bandwidth * 1e3, "configs": configs}  # fmt: skip
    ref = None
    for variant in variants:
        pdl, vops = VARIANTS[variant]
        vops = {"ops": ops, "fused": fused, None: None}[vops]
        b = bufs()

        def step(b=b, variant=variant, pdl=pdl, vops=vops):
            b["h"].copy_(start)
            b["res"].zero_()
            return chain(variant, layers, gammas, b, vops, pdl)

        try:
            got = step().float()
            torch.cuda.synchronize()
            ms = _time_graph(step)
        except Exception as exc:  # e.g. a Triton without launch_pdl: the other variants still count
            print(f"  {variant}: failed: {exc!r}"[:400], file=sys.stderr)
            out[variant] = {"ms": float("inf"), "rel_err": None, "wrong": True, "error": repr(exc)[:400]}
            continue
        if ref is None:
            ref = got
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        out[variant] = {"ms": ms, "rel_err": err}
        print(f"  {variant:11s} {ms:6.3f} ms  {ms / out['floor_ms']:.2f}x floor  (max rel diff {err:.1e})",
              file=sys.stderr)  # fmt: skip
        if err > 5e-2:
            out[variant]["wrong"] = True
    layers.clear()
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--rows", default="8,32")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--variants", default="cublas,triton,triton+pdl,triton+pdl-late",
                    help=f"comma-separated, of {', '.join(VARIANTS)}; cublas first (the reference)")  # fmt: skip
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if variants[0] != "cublas" or not set(variants) <= set(VARIANTS):
        ap.error(f"--variants: cublas first, then any of {', '.join(VARIANTS)}")
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{card}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", file=sys.stderr)
    results = [measure(int(tp), int(r), args.layers, bandwidth, variants) for tp in args.tp.split(",") for r in
               args.rows.split(",")]  # fmt: skip
    names = variants
    print("| TP | rows | floor ms | " + " | ".join(f"{n} ms" for n in names) + " | best / cuBLAS | card |")
    print("|---" * (len(names) + 5) + "|")
    for r in results:
        best = min(r[n]["ms"] for n in names if not r[n].get("wrong"))
        cells = " | ".join(f"{r[n]['ms']:.3f}{' (wrong)' if r[n].get('wrong') else ''}" for n in names)
        print(f"| {r['tp']} | {r['rows']} | {r['floor_ms']:.3f} | {cells} | {best / r['cublas']['ms']:.2f} | {card} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "copy_bw_GBps": bandwidth / 1e9, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
