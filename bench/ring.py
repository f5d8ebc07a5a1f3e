"""A spike for issue 16: does a ring of weight tiles kept across tasks and phases close the persistent kernel's
per-phase gap?

Sessions 17-19 found the persistent kernel (:mod:`acb.kernels.persistent`) 1.4-2.7× a layer's weight-reading floor,
and its trace put the excess at each phase's start: a task loads its first weight tiles only after it waits for the
phase before, so each of a layer's four GEMM phases pays a memory latency and a pipeline ramp. Triton cannot load
ahead of a wait without holding the tiles in registers (27-39 % slower, session 18). Gluon (Triton's lower-level
dialect) can: ``cp.async`` copies land in shared memory while the program spins.

This kernel runs the four GEMMs of a decode layer (no norms, no residual: what is measured is the weight stream):

    y0 = x @ Wo^T   ->  y1 = act(y0 @ Wgu^T)  ->  y2 = y1 @ Wd^T  ->  y3 = y2 @ Wqkv^T

as one launch of one program per SM. Each phase's tasks are column tiles over the whole of K, dealt round-robin; a
task of phase p waits until every task of phase p - 1 is done. Weights stream through a ring of DEPTH shared-memory
slots; with ``cross`` the ring's next copies are issued as soon as a slot frees, for whichever task and phase comes
next in this program's list, so a program's weight reads never stop at a wait. Without it (the per-task pipeline, as
Triton does it) a task issues its first copies after its wait. The activations' tiles come from L2 through a second
ring, XA tiles ahead within the task.

    python -m bench.ring --model llama-1b                 # check, then time cross / per-task / cuBLAS / the floor
    python -m bench.ring --model llama-1b,gemma3-1b --depth 6,8 --json out.json

It needs Gluon (Triton >= 3.5) and a Hopper card; every layer of the shape is one CUDA graph, weights of their own
per layer (none served from L2), as ``bench.persistent``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

BM = 32  # rows (a decode step's sequences); the spike times exactly this many
SLOT_ELEMS = 8192  # bf16 elements of one weight tile: BN x BK = 16 KB
SLOT = gl.constexpr(SLOT_ELEMS)
SHARED = 227 * 1024  # what one program may allocate on Hopper
REPLAYS = 20


def _copy_layout(rows: int, cols: int) -> gl.BlockedLayout:
    """Four warps copying a [rows, cols] bf16 tile in 16-byte pieces, no thread twice."""
    tk = min(32, cols // 8)
    return gl.BlockedLayout([1, 8], [32 // tk, tk], [4, 1], [1, 0])


@gluon.jit
def _pick(i, a0, a1, a2, a3):
    r = a3
    if i == 0:
        r = a0
    elif i == 1:
        r = a1
    elif i == 2:
        r = a2
    return r


@gluon.jit
def _first(pid, off, G):
    """This program's first task at or after global index ``off`` (task t belongs to program t % G)."""
    return off + ((pid - off) % G + G) % G


@gluon.jit
def _copy_w(slot, W, K, n0, k0, live, BN: gl.constexpr, BK: gl.constexpr, CL: gl.constexpr, SL: gl.constexpr):
    """Start copying weight rows ``n0 ..+BN``, K ``k0 ..+BK`` into ``slot`` (nothing where ``live`` is false)."""
    dst = slot._reinterpret(gl.bfloat16, [BN, BK], SL)
    rn = gl.arange(0, BN, layout=gl.SliceLayout(1, CL))
    rk = gl.arange(0, BK, layout=gl.SliceLayout(0, CL))
    ptr = W + (n0 + rn)[:, None].to(gl.int64) * K + (k0 + rk)[None, :]
    lim = gl.where(live, BN, 0)
    cp.async_copy_global_to_shared(dst, ptr, mask=(rn < lim)[:, None])


@gluon.jit
def _copy_x(slot, X, K, k0, live, BK: gl.constexpr, CL: gl.constexpr, SL: gl.constexpr):
    """Start copying the activations' columns ``k0 ..+BK`` (every row) into ``slot``."""
    dst = slot._reinterpret(gl.bfloat16, [32, BK], SL)
    rm = gl.arange(0, 32, layout=gl.SliceLayout(1, CL))
    rk = gl.arange(0, BK, layout=gl.SliceLayout(0, CL))
    ptr = X + rm[:, None] * K + (k0 + rk)[None, :]
    lim = gl.where(live, 32, 0)
    cp.async_copy_global_to_shared(dst, ptr, mask=(rm < lim)[:, None])


@gluon.jit
def _issue_ahead(ring, j, cph, ct, cs, pid, G, W0, W1, W2, W3, K0, K1, K2, K3, T0, T1, T2, T3,
                 BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr,
                 CL0: gl.constexpr, CL1: gl.constexpr, CL2: gl.constexpr, CL3: gl.constexpr,
                 SL: gl.constexpr, DEPTH: gl.constexpr):  # fmt: skip
    """Copy the weight tile at this program's cursor (phase ``cph``, task ``ct``, stage ``cs``) into slot
    ``j % DEPTH`` and advance the cursor past it, into the next task or phase as needed."""
    slot = ring.index(j % DEPTH)
    live = cph < 4
    off1 = T0
    off2 = off1 + T1
    off3 = off2 + T2
    if cph == 0:
        _copy_w(slot, W0, K0, (ct - 0) * BN0, cs * (SLOT // BN0), live, BN0, SLOT // BN0, CL0, SL)
    elif cph == 1:
        _copy_w(slot, W1, K1, (ct - off1) * BN1, cs * (SLOT // BN1), live, BN1, SLOT // BN1, CL1, SL)
    elif cph == 2:
        _copy_w(slot, W2, K2, (ct - off2) * BN2, cs * (SLOT // BN2), live, BN2, SLOT // BN2, CL2, SL)
    else:
        _copy_w(slot, W3, K3, (ct - off3) * BN3, cs * (SLOT // BN3), live, BN3, SLOT // BN3, CL3, SL)
    # advance: the next stage, else this program's next task, else its first task of a later phase
    stages = _pick(cph, K0 // (SLOT // BN0), K1 // (SLOT // BN1), K2 // (SLOT // BN2), K3 // (SLOT // BN3))
    cs += 1
    if cs == stages:
        cs = 0
        cph, ct = _seek(cph, ct + G, pid, G, T0, T1, T2, T3)
    return cph, ct, cs


@gluon.jit
def _wait(CNT, idx, target):
    while gl.load(CNT + idx, volatile=True) < target:
        pass
    gl.atomic_add(CNT + idx, 0, sem="acquire")
    gl.thread_barrier()


@gluon.jit
def _phase(P: gl.constexpr, ring, xring, j, cph, ct, cs, pid, G, X, Y, CNT, prev_tasks, start, count, K, N,
           W0, W1, W2, W3, K0, K1, K2, K3, T0, T1, T2, T3,
           BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr,
           CL0: gl.constexpr, CL1: gl.constexpr, CL2: gl.constexpr, CL3: gl.constexpr,
           W_PTR, BN: gl.constexpr, CLW: gl.constexpr, CLX: gl.constexpr, TWO: gl.constexpr,
           SL: gl.constexpr, DEPTH: gl.constexpr, XA: gl.constexpr, CROSS: gl.constexpr):  # fmt: skip
    """This program's tasks of phase ``P``: column tiles ``BN`` wide (with ``TWO``, BN/2 gate rows then BN/2 up rows,
    whose SiLU(gate) * up makes BN/2 output columns)."""
    BK: gl.constexpr = SLOT // BN
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 2], instr_shape=[16, 8])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    OUT: gl.constexpr = BN // 2 if TWO else BN
    stages = K // BK
    for t in range(_first(pid, start, G), start + count, G):
        if P > 0:
            _wait(CNT, P - 1, prev_tasks)
        n0 = (t - start) * BN
        for i in gl.static_range(XA):  # this task's first activation tiles (and, per task, its first weights)
            _copy_x(xring.index(i), X, K, i * BK, i < stages, BK, CLX, SL)
            if not CROSS:
                _copy_w(ring.index((j + i) % DEPTH), W_PTR, K, n0, i * BK, i < stages, BN, BK, CLW, SL)
            cp.commit_group()
        acc = gl.zeros([32, OUT], gl.float32, MMA)
        acc_u = gl.zeros([32, OUT], gl.float32, MMA)
        for k in range(stages):
            cp.wait_group(XA - 1)
            w = ring.index(j % DEPTH)._reinterpret(gl.bfloat16, [BN, BK], SL)
            x = xring.index(k % XA)._reinterpret(gl.bfloat16, [32, BK], SL).load(A_L)
            if TWO:
                acc = mma_v2(x, w.slice(0, OUT, 0).permute((1, 0)).load(B_L), acc)
                acc_u = mma_v2(x, w.slice(OUT, OUT, 0).permute((1, 0)).load(B_L), acc_u)
            else:
                acc = mma_v2(x, w.permute((1, 0)).load(B_L), acc)
            gl.thread_barrier()  # every warp is done with both slots before they are refilled
            if CROSS:
                cph, ct, cs = _issue_ahead(ring, j + DEPTH, cph, ct, cs, pid, G, W0, W1, W2, W3,
                                           K0, K1, K2, K3, T0, T1, T2, T3, BN0, BN1, BN2, BN3,
                                           CL0, CL1, CL2, CL3, SL, DEPTH)  # fmt: skip
            else:
                _copy_w(ring.index((j + XA) % DEPTH), W_PTR, K, n0, (k + XA) * BK, k + XA < stages, BN, BK, CLW, SL)
            _copy_x(xring.index(k % XA), X, K, (k + XA) * BK, k + XA < stages, BK, CLX, SL)
            cp.commit_group()
            j += 1
        if TWO:
            acc = acc / (1.0 + gl.exp(-acc)) * acc_u
        rm = gl.arange(0, 32, layout=gl.SliceLayout(1, MMA))
        rn = gl.arange(0, OUT, layout=gl.SliceLayout(0, MMA))
        gl.store(Y + rm[:, None] * N + ((t - start) * OUT + rn)[None, :], acc.to(gl.bfloat16))
        gl.thread_barrier()
        gl.atomic_add(CNT + P, 1, sem="release")
    return j, cph, ct, cs


@gluon.jit
def _ring_kernel(X0, Y0, Y1, Y2, Y3, W0, W1, W2, W3, CNT, K0, K1, K2, K3, T0, T1, T2, T3, G,
                 BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr,
                 CL0: gl.constexpr, CL1: gl.constexpr, CL2: gl.constexpr, CL3: gl.constexpr,
                 CX0: gl.constexpr, CX1: gl.constexpr, CX2: gl.constexpr, CX3: gl.constexpr,
                 DEPTH: gl.constexpr, XA: gl.constexpr, XK: gl.constexpr, CROSS: gl.constexpr):  # fmt: skip
    pid = gl.program_id(0)
    SL: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    ring = gl.allocate_shared_memory(gl.bfloat16, [DEPTH, SLOT // 512, 512], SL)  # tiles viewed [BN, BK] per phase
    xring = gl.allocate_shared_memory(gl.bfloat16, [XA, 32, XK], SL)  # XK: the largest K per tile
    off1 = T0
    off2 = off1 + T1
    off3 = off2 + T2
    # the weight cursor: phase, global task index and stage of the next weight tile this program copies
    cph, ct = _seek(pid * 0, _first(pid, 0, G), pid, G, T0, T1, T2, T3)
    cs = 0
    j = 0
    if CROSS:
        for i in gl.static_range(DEPTH):
            cph, ct, cs = _issue_ahead(ring, i, cph, ct, cs, pid, G, W0, W1, W2, W3, K0, K1, K2, K3, T0, T1, T2, T3,
                                       BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3, SL, DEPTH)  # fmt: skip
            cp.commit_group()
    j, cph, ct, cs = _phase(0, ring, xring, j, cph, ct, cs, pid, G, X0, Y0, CNT, 0, 0, T0, K0, T0 * BN0,
                            W0, W1, W2, W3, K0, K1, K2, K3, T0, T1, T2, T3, BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3,
                            W0, BN0, CL0, CX0, False, SL, DEPTH, XA, CROSS)  # fmt: skip
    j, cph, ct, cs = _phase(1, ring, xring, j, cph, ct, cs, pid, G, Y0, Y1, CNT, T0, off1, T1, K1, T1 * (BN1 // 2),
                            W0, W1, W2, W3, K0, K1, K2, K3, T0, T1, T2, T3, BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3,
                            W1, BN1, CL1, CX1, True, SL, DEPTH, XA, CROSS)  # fmt: skip
    j, cph, ct, cs = _phase(2, ring, xring, j, cph, ct, cs, pid, G, Y1, Y2, CNT, T1, off2, T2, K2, T2 * BN2,
                            W0, W1, W2, W3, K0, K1, K2, K3, T0, T1, T2, T3, BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3,
                            W2, BN2, CL2, CX2, False, SL, DEPTH, XA, CROSS)  # fmt: skip
    j, cph, ct, cs = _phase(3, ring, xring, j, cph, ct, cs, pid, G, Y2, Y3, CNT, T2, off3, T3, K3, T3 * BN3,
                            W0, W1, W2, W3, K0, K1, K2, K3, T0, T1, T2, T3, BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3,
                            W3, BN3, CL3, CX3, False, SL, DEPTH, XA, CROSS)  # fmt: skip
    cp.wait_group(0)
    done = gl.atomic_add(CNT + 4, 1, sem="acq_rel")
    if done == G - 1:  # the last program out zeroes the counters for the next launch
        for i in gl.static_range(5):
            gl.store(CNT + i, 0)


@gluon.jit
def _seek(cph, ct, pid, G, T0, T1, T2, T3):
    """The first task at or after (phase ``cph``, global task ``ct``) that this program has: ``ct`` itself if it is
    inside phase ``cph``, else this program's first task of the next phase that gives it one (phase 4: none)."""
    off1 = T0
    off2 = off1 + T1
    off3 = off2 + T2
    end = _pick(cph, off1, off2, off3, off3 + T3)
    while (cph < 4) & (ct >= end):
        cph += 1
        ct = _first(pid, _pick(cph, 0, off1, off2, off3), G)
        end = _pick(cph, off1, off2, off3, off3 + T3)
    return cph, ct


# -- the host side -------------------------------------------------------------------------------------------------


def gate_up_tiles(gate: torch.Tensor, up: torch.Tensor, bn: int) -> torch.Tensor:
    """Gate and up weights ``[inter, K]`` as one ``[2 * inter, K]`` matrix whose row tile ``t`` (``bn`` rows) is
    gate rows ``t * bn/2 ..`` then the same up rows: the kernel's phase 1 reads it a tile at a time."""
    half = bn // 2
    k = gate.shape[1]
    return torch.cat([gate.view(-1, half, k), up.view(-1, half, k)], dim=1).reshape(-1, k).contiguous()


def layer_weights(s: dict, layers: int, bn_gu: int) -> list[dict]:
    torch.manual_seed(0)
    b = dict(device="cuda", dtype=torch.bfloat16)

    def w(n, k):
        return torch.randn(n, k, **b) / k**0.5

    out = []
    for _ in range(layers):
        gate, up = w(s["inter"], s["hidden"]), w(s["inter"], s["hidden"])
        out.append(dict(o=w(s["hidden"], s["dq"]), gate=gate, up=up, gu=gate_up_tiles(gate, up, bn_gu),
                        gu_plain=torch.cat([gate, up]), down=w(s["hidden"], s["inter"]),
                        qkv=w(s["nqkv"], s["hidden"])))  # fmt: skip
    return out


def reference(x0: torch.Tensor, lw: dict) -> list[torch.Tensor]:
    """The chain in torch: float32 products of the bf16 operands, each output rounded to bf16 (as the kernel)."""
    y0 = (x0.float() @ lw["o"].float().T).bfloat16()
    g, u = y0.float() @ lw["gate"].float().T, y0.float() @ lw["up"].float().T
    y1 = (F.silu(g) * u).bfloat16()
    y2 = (y1.float() @ lw["down"].float().T).bfloat16()
    return [y0, y1, y2, (y2.float() @ lw["qkv"].float().T).bfloat16()]


class Ring:
    """Launches of :func:`_ring_kernel` for one layer shape and one choice of tiles."""

    def __init__(self, s: dict, bns: tuple[int, int, int, int], depth: int, xa: int, cross: bool):
        self.bns, self.depth, self.xa, self.cross = bns, depth, xa, cross
        ks = (s["dq"], s["hidden"], s["inter"], s["hidden"])
        ns = (s["hidden"], 2 * s["inter"], s["hidden"], s["nqkv"])
        for n, k, bn in zip(ns, ks, bns):
            if n % bn or k % (SLOT_ELEMS // bn) or SLOT_ELEMS // bn > 512:
                raise ValueError(f"tile {bn} does not divide the GEMM {n} x {k} (K per tile {SLOT_ELEMS // bn})")
        self.xk = max(SLOT_ELEMS // bn for bn in bns)
        if depth < xa or (depth * SLOT_ELEMS + xa * BM * self.xk) * 2 > SHARED:
            raise ValueError(f"depth {depth} and {xa} activation tiles do not fit")
        self.ks, self.tasks = ks, tuple(n // bn for n, bn in zip(ns, bns))
        self.G = torch.cuda.get_device_properties(0).multi_processor_count
        self.cnt = torch.zeros(8, dtype=torch.int32, device="cuda")
        outs = (s["hidden"], s["inter"], s["hidden"], s["nqkv"])
        self.ys = [torch.empty(BM, n, device="cuda", dtype=torch.bfloat16) for n in outs]
        self.cl = [_copy_layout(bn, SLOT_ELEMS // bn) for bn in bns]
        self.cx = [_copy_layout(BM, SLOT_ELEMS // bn) for bn in bns]

    def __call__(self, x0: torch.Tensor, lw: dict) -> list[torch.Tensor]:
        _ring_kernel[(self.G,)](
            x0, *self.ys, lw["o"], lw["gu"], lw["down"], lw["qkv"], self.cnt, *self.ks, *self.tasks, self.G,
            *self.bns, *self.cl, *self.cx, self.depth, self.xa, self.xk, self.cross, num_warps=4,
        )  # fmt: skip
        return self.ys


def cublas_chain(x0: torch.Tensor, lw: dict, bufs: list[torch.Tensor]) -> None:
    """The same four GEMMs one cuBLAS call each, with the activation as two torch kernels (the per-op baseline)."""
    y0, y1, y2, y3 = bufs
    torch.mm(x0, lw["o"].T, out=y0)
    torch.mm(y0, lw["gu_plain"].T, out=y1)
    inter = lw["gate"].shape[0]
    a = F.silu(y1[:, :inter]) * y1[:, inter:]
    torch.mm(a, lw["down"].T, out=y2)
    torch.mm(y2, lw["qkv"].T, out=y3)


def measure(model: str, bns: tuple[int, ...], depths: list[int], xa: int, bandwidth: float) -> list[dict]:
    from .persistent import shapes, time_layers

    s = shapes(model)
    layers = layer_weights(s, s["layers"], bns[1])
    x0 = torch.randn(BM, s["dq"], device="cuda", dtype=torch.bfloat16)
    weight_bytes = sum(lw.numel() * 2 for k, lw in layers[0].items() if k in ("o", "gu", "down", "qkv"))
    base = dict(model=model, rows=BM, floor_us=weight_bytes / bandwidth * 1e6, bns=list(bns), xa=xa)
    bufs = [torch.empty(BM, n, device="cuda", dtype=torch.bfloat16) for n in (s["hidden"], 2 * s["inter"],
                                                                               s["hidden"], s["nqkv"])]  # fmt: skip
    out = [dict(base, variant="cuBLAS per op", us=time_layers(lambda lw: cublas_chain(x0, lw, bufs), layers))]
    want = reference(x0, layers[0])
    for depth in depths:
        for cross in (True, False):
            if not cross and depth != depths[0]:
                continue  # the per-task pipeline uses XA slots of the ring, whatever DEPTH is
            ring = Ring(s, bns, depth if cross else max(depth, xa), xa, cross)
            got = ring(x0, layers[0])
            for p, (x, y) in enumerate(zip(got, want)):
                err = (x.float() - y.float()).abs().max().item()
                if err > 0.05 * max(1.0, y.float().abs().max().item()):
                    raise AssertionError(f"{model} depth {depth} cross {cross}: phase {p} off by {err}")
            ring(x0, layers[0])  # the counters were reset: a second launch gives the same
            name = f"ring, depth {depth}, across tasks" if cross else f"per-task pipeline, {xa} tiles"
            us = time_layers(lambda lw, ring=ring: ring(x0, lw), layers)
            out.append(dict(base, variant=name, depth=depth, cross=cross, us=us))
    return out


def main(argv: list[str] | None = None) -> int:
    from .run import copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--tiles", default="16,64,16,16", help="BN of the O, gate/up, down and Q/K/V phases")
    ap.add_argument("--depth", default="6,8,10", help="weight tiles in the ring (16 KB each)")
    ap.add_argument("--xa", type=int, default=3, help="activation tiles in flight within a task")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    bandwidth = copy_bandwidth()
    bns = tuple(int(b) for b in args.tiles.split(","))
    rows = []
    for model in args.model.split(","):
        rows += measure(model, bns, [int(d) for d in args.depth.split(",")], args.xa, bandwidth)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; µs per layer, the four GEMMs of a decode layer, {BM} rows")
    print("| model | variant | µs | / floor |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['us']:.1f} | {r['us'] / r['floor_us']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bandwidth, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
