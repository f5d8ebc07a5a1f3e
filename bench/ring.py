"""A spike for issue 16: does a ring of weight tiles kept across tasks and phases close the persistent kernel's
per-phase gap?

Sessions 17-19 found the persistent kernel (``acb/kernels/persistent.py``, removed in session 21: see git history at
8efec7e) 1.4-2.7× a layer's weight-reading floor, and its trace put the excess at each phase's start: a task loads its
first weight tiles only after it waits for the phase before, so each of a layer's four GEMM phases pays a memory
latency and a pipeline ramp. Triton cannot load ahead of a wait without holding the tiles in registers (27-39 %
slower, session 18). Gluon (Triton's lower-level dialect) can: ``cp.async`` copies land in shared memory while the
program spins.

This kernel runs the four GEMMs of a decode layer (no norms, no residual: what is measured is the weight stream):

    y0 = x @ Wo^T   ->  y1 = act(y0 @ Wgu^T)  ->  y2 = y1 @ Wd^T  ->  y3 = y2 @ Wqkv^T

as one launch of one program per SM. Each phase's tasks are column tiles (128 weight rows) times splits of K, dealt
round-robin; a split's partial product is added into the float32 output with atomics (the phase two ahead zeroes a
buffer before it is accumulated into again). A task of phase p waits until every task of phase p - 1 is done.

Weights stream by TMA through a ring of DEPTH shared-memory slots, each with its own barrier; with ``cross`` the
ring's next copy is issued as soon as a slot frees, for whichever task and phase comes next in this program's list,
so a program's weight reads never stop at a wait. Without it (the per-task pipeline, as Triton does it) a task
issues its first DEPTH copies after its wait. The activations' tiles (float32) come from L2 by ``cp.async``, XA tiles
ahead within the task. ``no waits`` drops the waits (wrong results, unchecked): the bound that waiting can approach;
``weights only`` also drops the activations and the products: the TMA stream of the weights alone. (Session 20's
first two versions copied the weights by ``cp.async`` too, in the same commit groups as the activations, which forced
each weight copy to land within XA tiles: the ring could not run ahead.)

    python -m bench.ring --model llama-1b                 # check, then time cross / per-task / cuBLAS / the floor
    python -m bench.ring --model llama-1b,qwen3-1.7b --depth 6,8 --json out.json

It needs Gluon as Triton 3.6 spells it and a Hopper card; every layer of the shape is one CUDA graph, weights of
their own per layer (none served from L2).
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
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .workloads import FAMILY_MODELS

BM = 32  # rows (a decode step's sequences); the spike times exactly this many
TILE = (128, 64)  # a weight tile: 128 rows (gate/up: 64 gate rows then the same up rows) x 64 of K, 16 KB
BN, BK = gl.constexpr(TILE[0]), gl.constexpr(TILE[1])  # (one TMA box: 128-byte rows)
SHARED = 227 * 1024  # what one program may allocate on Hopper


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


def report(rows: list[dict], columns: dict, bandwidth: float, path: str | None) -> None:
    """Print ``rows`` as a markdown table, ``columns`` mapping each header to its cell (a function of a row), and
    with ``path`` write them as JSON with the copy bandwidth and the card: the layout of the kernel spikes' committed
    raw results (bench.ring, bench.wsgemm, bench.wschain)."""
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(cell(r) for cell in columns.values()) + " |")
    if path:
        with open(path, "w") as f:
            json.dump(dict(bandwidth=bandwidth, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


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


@gluon.jit
def _tma_w(ring, bars, jw, desc, u, SP, K, k, DEPTH: gl.constexpr):
    """Start the TMA copy of stage ``k`` of task ``u``'s weights (tile ``u // SP``, split ``u % SP`` of ``K`` each)
    into ring slot ``jw % DEPTH``; its barrier completes when the bytes have landed."""
    bar = bars.index(jw % DEPTH)
    mbarrier.expect(bar, BN * BK * 2)
    tma.async_copy_global_to_shared(desc, [(u // SP) * BN, (u % SP) * K + k * BK], bar, ring.index(jw % DEPTH))


@gluon.jit
def _issue_ahead(ring, bars, jw, cph, ct, cs, pid, G, D0, D1, D2, D3, SP0, SP1, SP2, SP3, K0, K1, K2, K3,
                 T0, T1, T2, T3, DEPTH: gl.constexpr):  # fmt: skip
    """Copy the weight tile at this program's cursor (phase ``cph``, global task ``ct``, stage ``cs``) into the
    ring, if there is one left, and advance the cursor past it, into the next task or phase as needed."""
    off1 = T0
    off2 = off1 + T1
    off3 = off2 + T2
    if cph < 4:
        if cph == 0:
            _tma_w(ring, bars, jw, D0, ct, SP0, K0, cs, DEPTH)
        elif cph == 1:
            _tma_w(ring, bars, jw, D1, ct - off1, SP1, K1, cs, DEPTH)
        elif cph == 2:
            _tma_w(ring, bars, jw, D2, ct - off2, SP2, K2, cs, DEPTH)
        else:
            _tma_w(ring, bars, jw, D3, ct - off3, SP3, K3, cs, DEPTH)
        jw += 1
        cs += 1
        if cs == _pick(cph, K0 // BK, K1 // BK, K2 // BK, K3 // BK):
            cs = 0
            cph, ct = _seek(cph, ct + G, pid, G, T0, T1, T2, T3)
    return jw, cph, ct, cs


@gluon.jit
def _copy_x(slot, X, KS, u, SP, K, k, live, CL: gl.constexpr):
    """Start copying stage ``k`` of task ``u``'s activations (float32 ``[BM, BK]``, every row) into ``slot``."""
    rm = gl.arange(0, 32, layout=gl.SliceLayout(1, CL))
    rk = gl.arange(0, BK, layout=gl.SliceLayout(0, CL))
    ptr = X + rm[:, None] * KS + ((u % SP) * K + k * BK + rk)[None, :]
    lim = gl.where(live, 32, 0)
    cp.async_copy_global_to_shared(slot, ptr, mask=(rm < lim)[:, None])


@gluon.jit
def _wait(CNT, idx, target):
    """Spin until counter ``idx`` reaches ``target`` (acquiring loads: what those tasks wrote is then visible)."""
    while gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [CNT + idx], dtype=gl.int32,
                                    is_pure=False, pack=1) < target:  # fmt: skip
        pass
    gl.thread_barrier()


@gluon.jit
def _phase(P: gl.constexpr, ring, bars, xring, j, jw, cph, ct, cs, pid, G, X, Y, Z, z_numel, CNT, prev_tasks,
           start, D0, D1, D2, D3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
           D, KS, SP, K, count, N, TWO: gl.constexpr, DEPTH: gl.constexpr, XA: gl.constexpr,
           CROSS: gl.constexpr, WAIT: gl.constexpr, MATH: gl.constexpr):  # fmt: skip
    """This program's tasks of phase ``P``: a column tile of BN weight rows times a split of K each (with ``TWO``,
    64 gate rows then 64 up rows, whose SiLU(gate) * up makes 64 output columns; no split)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 2], instr_shape=[16, 8])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    XL: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])  # a [32, 64] float32 tile, 16 B a piece
    ZL: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
    OUT: gl.constexpr = BN // 2 if TWO else BN
    stages = K // BK
    for t in range(_first(pid, start, G), start + count, G):
        u = t - start
        if P > 0 and WAIT:
            _wait(CNT, P - 1, prev_tasks)
        if z_numel > 0:  # zero this task's share of the buffer the phase two ahead accumulates into
            per = gl.cdiv(z_numel, count)
            hi = gl.minimum((u + 1) * per, z_numel)
            for z0 in range(u * per, hi, 512):
                rz = z0 + gl.arange(0, 512, layout=ZL)
                gl.store(Z + rz, gl.zeros([512], gl.float32, ZL), mask=rz < hi)
        if not CROSS:  # the per-task pipeline: this task's first weight tiles, now that it may start
            for i in gl.static_range(DEPTH):
                if i < stages:
                    _tma_w(ring, bars, jw, D, u, SP, K, i, DEPTH)
                    jw += 1
        for i in gl.static_range(XA):  # this task's first activation tiles
            _copy_x(xring.index(i), X, KS, u, SP, K, i, (i < stages) & MATH, XL)
            cp.commit_group()
        acc = gl.zeros([32, OUT], gl.float32, MMA)
        acc_u = gl.zeros([32, OUT], gl.float32, MMA)
        for k in range(stages):
            cp.wait_group(XA - 1)
            mbarrier.wait(bars.index(j % DEPTH), (j // DEPTH) & 1)
            w = ring.index(j % DEPTH)
            if MATH:
                x = gl.convert_layout(xring.index(k % XA).load(XL).to(gl.bfloat16), A_L)
                if TWO:
                    acc = mma_v2(x, w.slice(0, OUT, 0).permute((1, 0)).load(B_L), acc)
                    acc_u = mma_v2(x, w.slice(OUT, OUT, 0).permute((1, 0)).load(B_L), acc_u)
                else:
                    acc = mma_v2(x, w.permute((1, 0)).load(B_L), acc)
            gl.thread_barrier()  # every warp is done with both slots before they are refilled
            fence_async_shared()  # (and the TMA's writes come after those reads)
            if CROSS:
                jw, cph, ct, cs = _issue_ahead(ring, bars, jw, cph, ct, cs, pid, G, D0, D1, D2, D3,
                                               SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                                               DEPTH)  # fmt: skip
            elif k + DEPTH < stages:
                _tma_w(ring, bars, jw, D, u, SP, K, k + DEPTH, DEPTH)
                jw += 1
            _copy_x(xring.index(k % XA), X, KS, u, SP, K, k + XA, (k + XA < stages) & MATH, XL)
            cp.commit_group()
            j += 1
        if TWO:
            acc = acc / (1.0 + gl.exp(-acc)) * acc_u
        rm = gl.arange(0, 32, layout=gl.SliceLayout(1, MMA))
        rn = gl.arange(0, OUT, layout=gl.SliceLayout(0, MMA))
        out = Y + rm[:, None] * N + ((u // SP) * OUT + rn)[None, :]
        if SP > 1:
            gl.atomic_add(out, acc, sem="relaxed")
        else:
            gl.store(out, acc)
        gl.thread_barrier()
        gl.atomic_add(CNT + P, 1, sem="release")
    return j, jw, cph, ct, cs


@gluon.jit
def _ring_kernel(X0, Y0, Y1, Y2, Y3, D0, D1, D2, D3, CNT, KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3,
                 K0, K1, K2, K3, T0, T1, T2, T3, N0, N1, N2, N3, Z0, Z1, Z2, Z3, G,
                 DEPTH: gl.constexpr, XA: gl.constexpr, CROSS: gl.constexpr, WAIT: gl.constexpr,
                 MATH: gl.constexpr):  # fmt: skip
    pid = gl.program_id(0)
    XSL: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    ring = gl.allocate_shared_memory(gl.bfloat16, [DEPTH, BN, BK], D0.layout)
    bars = gl.allocate_shared_memory(gl.int64, [DEPTH, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(DEPTH):
        mbarrier.init(bars.index(i), count=1)
    xring = gl.allocate_shared_memory(gl.float32, [XA, 32, BK], XSL)
    off1 = T0
    off2 = off1 + T1
    off3 = off2 + T2
    # the weight cursor: phase, global task index and stage of the next weight tile this program copies
    cph, ct = _seek(pid * 0, _first(pid, 0, G), pid, G, T0, T1, T2, T3)
    cs = pid * 0
    j = pid * 0  # weight tiles consumed
    jw = pid * 0  # weight tiles issued
    if CROSS:
        for i in gl.static_range(DEPTH):
            jw, cph, ct, cs = _issue_ahead(ring, bars, jw, cph, ct, cs, pid, G, D0, D1, D2, D3, SP0, SP1, SP2, SP3,
                                           K0, K1, K2, K3, T0, T1, T2, T3, DEPTH)  # fmt: skip
    # phase p zeroes, if it is accumulated into, the output of phase p + 2 (mod 4): nobody reads it then
    j, jw, cph, ct, cs = _phase(0, ring, bars, xring, j, jw, cph, ct, cs, pid, G, X0, Y0, Y2, Z2, CNT, 0, 0,
                                D0, D1, D2, D3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                                D0, KS0, SP0, K0, T0, N0, False, DEPTH, XA, CROSS, WAIT, MATH)  # fmt: skip
    j, jw, cph, ct, cs = _phase(1, ring, bars, xring, j, jw, cph, ct, cs, pid, G, Y0, Y1, Y3, Z3, CNT, T0, off1,
                                D0, D1, D2, D3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                                D1, KS1, SP1, K1, T1, N1, True, DEPTH, XA, CROSS, WAIT, MATH)  # fmt: skip
    j, jw, cph, ct, cs = _phase(2, ring, bars, xring, j, jw, cph, ct, cs, pid, G, Y1, Y2, Y0, Z0, CNT, T1, off2,
                                D0, D1, D2, D3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                                D2, KS2, SP2, K2, T2, N2, False, DEPTH, XA, CROSS, WAIT, MATH)  # fmt: skip
    j, jw, cph, ct, cs = _phase(3, ring, bars, xring, j, jw, cph, ct, cs, pid, G, Y2, Y3, Y1, Z1, CNT, T2, off3,
                                D0, D1, D2, D3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                                D3, KS3, SP3, K3, T3, N3, False, DEPTH, XA, CROSS, WAIT, MATH)  # fmt: skip
    cp.wait_group(0)
    for i in gl.static_range(DEPTH):
        mbarrier.invalidate(bars.index(i))
    done = gl.atomic_add(CNT + 4, 1, sem="acq_rel")
    if done == G - 1:  # the last program out zeroes the counters for the next launch
        for i in gl.static_range(5):
            gl.store(CNT + i, 0)


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
    """The chain in torch, as the kernel rounds it: each phase's float32 input rounded to bf16, float32 products."""

    def mm(x, w):
        return x.bfloat16().float() @ w.float().T

    y0 = mm(x0, lw["o"])
    y1 = F.silu(mm(y0, lw["gate"])) * mm(y0, lw["up"])
    y2 = mm(y1, lw["down"])
    return [y0, y1, y2, mm(y2, lw["qkv"])]


class Ring:
    """Launches of :func:`_ring_kernel` for one layer shape and one choice of splits."""

    def __init__(self, s: dict, splits, depth: int, xa: int, cross: bool, wait: bool = True, math: bool = True,
                 per_sm: int = 1):  # fmt: skip
        self.depth, self.xa, self.cross, self.wait, self.math = depth, xa, cross, wait, math
        ks = (s["dq"], s["hidden"], s["inter"], s["hidden"])
        ns = (s["hidden"], 2 * s["inter"], s["hidden"], s["nqkv"])
        self.splits = tuple(1 if p == 1 else sp for p, sp in enumerate(splits))  # gate/up: the activation needs all K
        for n, k, sp in zip(ns, ks, self.splits):
            if n % TILE[0] or k % (sp * TILE[1]):
                raise ValueError(f"tiles of {TILE} and {sp} splits do not divide the GEMM {n} x {k}")
        if (depth * TILE[0] * TILE[1] * 2 + xa * BM * TILE[1] * 4 + 8 * 1024) * per_sm > SHARED:
            raise ValueError(f"depth {depth} and {xa} activation tiles do not fit")
        self.ks_full, self.k_split = ks, tuple(k // sp for k, sp in zip(ks, self.splits))
        self.tasks = tuple(n // TILE[0] * sp for n, sp in zip(ns, self.splits))
        # every program must be resident at once (they wait for each other): per_sm of them fit on each SM
        self.G = torch.cuda.get_device_properties(0).multi_processor_count * per_sm
        self.cnt = torch.zeros(8, dtype=torch.int32, device="cuda")
        outs = (s["hidden"], s["inter"], s["hidden"], s["nqkv"])
        self.ys = [torch.zeros(BM, n, device="cuda", dtype=torch.float32) for n in outs]
        self.zero = tuple(y.numel() if sp > 1 else 0 for y, sp in zip(self.ys, self.splits))

    @staticmethod
    def descriptors(lw: dict) -> list:
        """TMA descriptors of a layer's four weights, one [BN, BK] box each."""
        layout = gl.NVMMASharedLayout.get_default_for(list(TILE), gl.bfloat16)
        return [TensorDescriptor.from_tensor(lw[k], list(TILE), layout) for k in ("o", "gu", "down", "qkv")]

    def __call__(self, x0: torch.Tensor, lw: dict) -> list[torch.Tensor]:
        if "descs" not in lw:
            lw["descs"] = self.descriptors(lw)
        _ring_kernel[(self.G,)](
            x0, *self.ys, *lw["descs"], self.cnt, *self.ks_full, *self.splits, *self.k_split, *self.tasks,
            *(y.shape[1] for y in self.ys), *self.zero, self.G, self.depth, self.xa, self.cross, self.wait,
            self.math, num_warps=4,
        )  # fmt: skip
        return self.ys


def cublas_chain(x0: torch.Tensor, lw: dict, bufs: list[torch.Tensor]) -> None:
    """The same four GEMMs one cuBLAS call each (bf16 in and out), with the activation as two torch kernels: the
    per-op baseline."""
    y0, y1, y2, y3 = bufs
    torch.mm(x0, lw["o"].T, out=y0)
    torch.mm(y0, lw["gu_plain"].T, out=y1)
    inter = lw["gate"].shape[0]
    a = F.silu(y1[:, :inter]) * y1[:, inter:]
    torch.mm(a, lw["down"].T, out=y2)
    torch.mm(y2, lw["qkv"].T, out=y3)


def measure(model: str, splits, depths: list[int], xa: int, bandwidth: float, per_sm: int = 1) -> list[dict]:
    s = shapes(model)
    layers = layer_weights(s, s["layers"], TILE[0])
    x0 = torch.randn(BM, s["dq"], device="cuda", dtype=torch.float32)
    weight_bytes = sum(lw.numel() * 2 for k, lw in layers[0].items() if k in ("o", "gu", "down", "qkv"))
    base = dict(model=model, rows=BM, floor_us=weight_bytes / bandwidth * 1e6, splits=list(splits), xa=xa,
                per_sm=per_sm)  # fmt: skip
    bufs = [torch.empty(BM, n, device="cuda", dtype=torch.bfloat16) for n in (s["hidden"], 2 * s["inter"],
                                                                               s["hidden"], s["nqkv"])]  # fmt: skip
    xb = x0.bfloat16()
    out = [dict(base, variant="cuBLAS per op", us=time_layers(lambda lw: cublas_chain(xb, lw, bufs), layers))]
    want = reference(x0, layers[0])
    variants = [(d, True, True, True) for d in depths] + [(d, False, True, True) for d in depths]
    variants += [(d, True, False, True) for d in depths] + [(d, True, False, False) for d in depths]
    for depth, cross, wait, math in variants:
        ring = Ring(s, splits, depth, xa, cross, wait, math, per_sm)
        if wait:
            for _ in range(2):  # a second launch gives the same: the counters and the accumulated buffers were reset
                got = ring(x0, layers[0])
                for p, (x, y) in enumerate(zip(got, want)):
                    if p == 0 and ring.splits[0] > 1:
                        continue  # phase 2 zeroed it for the next launch
                    err = (x - y).abs().max().item()
                    if err > 0.02 * max(1.0, y.abs().max().item()):
                        raise AssertionError(f"{model} depth {depth} cross {cross}: phase {p} off by {err}")
        if not math:
            name = f"weights only (no activations, no products, no waits), depth {depth}"
        elif not wait:
            name = f"no waits, depth {depth}"
        elif cross:
            name = f"ring, depth {depth}, across tasks"
        else:
            name = f"per-task pipeline, depth {depth}"
        us = time_layers(lambda lw, ring=ring: ring(x0, lw), layers)
        out.append(dict(base, variant=name, depth=depth, cross=cross, wait=wait, math=math, us=us))
    return out


def main(argv: list[str] | None = None) -> int:
    from .run import copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--splits", default="8,1,8,4", help="splits of K of the O, gate/up, down and Q/K/V phases")
    ap.add_argument("--depth", default="4,8,12", help="weight tiles in the ring (16 KB each)")
    ap.add_argument("--xa", type=int, default=3, help="activation tiles in flight within a task")
    ap.add_argument("--per-sm", type=int, default=1, help="programs per SM (all resident: the ring shrinks to fit)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    bandwidth = copy_bandwidth()
    splits = tuple(int(b) for b in args.splits.split(","))
    rows = []
    for model in args.model.split(","):
        rows += measure(model, splits, [int(d) for d in args.depth.split(",")], args.xa, bandwidth, args.per_sm)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; µs per layer, the four GEMMs of a decode layer, {BM} rows")
    report(rows, {"model": lambda r: r["model"], "splits": lambda r: f"{r['splits']}", "programs per SM":
                  lambda r: f"{r['per_sm']}", "variant": lambda r: r["variant"], "µs": lambda r: f"{r['us']:.1f}",
                  "/ floor": lambda r: f"{r['us'] / r['floor_us']:.2f}×"}, bandwidth, args.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
