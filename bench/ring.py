"""A spike for issue 16: does a ring of weight tiles kept across tasks and phases close the persistent kernel's
per-phase gap?

Sessions 17-19 found the persistent kernel (:mod:`acb.kernels.persistent`) 1.4-2.7× a layer's weight-reading floor,
and its trace put the excess at each phase's start: a task loads its first weight tiles only after it waits for the
phase before, so each of a layer's four GEMM phases pays a memory latency and a pipeline ramp. Triton cannot load
ahead of a wait without holding the tiles in registers (27-39 % slower, session 18). Gluon (Triton's lower-level
dialect) can: ``cp.async`` copies land in shared memory while the program spins.

This kernel runs the four GEMMs of a decode layer (no norms, no residual: what is measured is the weight stream):

    y0 = x @ Wo^T   ->  y1 = act(y0 @ Wgu^T)  ->  y2 = y1 @ Wd^T  ->  y3 = y2 @ Wqkv^T

as one launch of one program per SM. Each phase's tasks are column tiles times splits of K, dealt round-robin; a
split's partial product is added into the float32 output with atomics (the phase two ahead zeroes a buffer before
it is accumulated into again). A task of phase p waits until every task of phase p - 1 is done. Weights stream
through a ring of DEPTH shared-memory slots; with ``cross`` the ring's next copies are issued as soon as a slot
frees, for whichever task and phase comes next in this program's list, so a program's weight reads never stop at a
wait. Without it (the per-task pipeline, as Triton does it) a task issues its first copies after its wait. The
activations' tiles come from L2 through a second ring, XA tiles ahead within the task. ``--no-wait`` drops the
waits (wrong results, unchecked): the streaming alone, the bound that waits can approach.

    python -m bench.ring --model llama-1b                 # check, then time cross / per-task / cuBLAS / the floor
    python -m bench.ring --model llama-1b,qwen3-1.7b --depth 6,8 --json out.json

It needs Gluon as Triton 3.6 spells it and a Hopper card; every layer of the shape is one CUDA graph, weights of
their own per layer (none served from L2), as ``bench.persistent``.
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


def _copy_layout(rows: int, cols: int, per: int) -> gl.BlockedLayout:
    """Four warps copying a [rows, cols] tile in 16-byte pieces of ``per`` elements, no thread twice."""
    tk = min(32, cols // per)
    return gl.BlockedLayout([1, per], [32 // tk, tk], [4, 1], [1, 0])


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
def _copy_w(slot, W, KS, u, SP, K, k, live, BN: gl.constexpr, CL: gl.constexpr, SL: gl.constexpr):
    """Start copying stage ``k`` of task ``u``'s weights (tile ``u // SP``, split ``u % SP`` of ``K`` each; ``KS``
    the row length) into ``slot``; nothing where ``live`` is false."""
    BK: gl.constexpr = SLOT // BN
    dst = slot._reinterpret(gl.bfloat16, [BN, BK], SL)
    rn = gl.arange(0, BN, layout=gl.SliceLayout(1, CL))
    rk = gl.arange(0, BK, layout=gl.SliceLayout(0, CL))
    n0 = (u // SP) * BN
    k0 = (u % SP) * K + k * BK
    ptr = W + (n0 + rn)[:, None].to(gl.int64) * KS + (k0 + rk)[None, :]
    lim = gl.where(live, BN, 0)
    cp.async_copy_global_to_shared(dst, ptr, mask=(rn < lim)[:, None])


@gluon.jit
def _copy_x(slot, X, KS, u, SP, K, k, live, BK: gl.constexpr, CL: gl.constexpr, XSL: gl.constexpr):
    """Start copying stage ``k`` of task ``u``'s activations (float32, every row) into ``slot``."""
    dst = slot._reinterpret(gl.float32, [32, BK], XSL)
    rm = gl.arange(0, 32, layout=gl.SliceLayout(1, CL))
    rk = gl.arange(0, BK, layout=gl.SliceLayout(0, CL))
    ptr = X + rm[:, None] * KS + ((u % SP) * K + k * BK + rk)[None, :]
    lim = gl.where(live, 32, 0)
    cp.async_copy_global_to_shared(dst, ptr, mask=(rm < lim)[:, None])


@gluon.jit
def _issue_ahead(ring, j, cph, ct, cs, pid, G, W0, W1, W2, W3, KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3,
                 K0, K1, K2, K3, T0, T1, T2, T3,
                 BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr,
                 CL0: gl.constexpr, CL1: gl.constexpr, CL2: gl.constexpr, CL3: gl.constexpr,
                 SL: gl.constexpr, DEPTH: gl.constexpr):  # fmt: skip
    """Copy the weight tile at this program's cursor (phase ``cph``, global task ``ct``, stage ``cs``) into slot
    ``j % DEPTH`` and advance the cursor past it, into the next task or phase as needed."""
    slot = ring.index(j % DEPTH)
    live = cph < 4
    off1 = T0
    off2 = off1 + T1
    off3 = off2 + T2
    if cph == 0:
        _copy_w(slot, W0, KS0, ct, SP0, K0, cs, live, BN0, CL0, SL)
    elif cph == 1:
        _copy_w(slot, W1, KS1, ct - off1, SP1, K1, cs, live, BN1, CL1, SL)
    elif cph == 2:
        _copy_w(slot, W2, KS2, ct - off2, SP2, K2, cs, live, BN2, CL2, SL)
    else:
        _copy_w(slot, W3, KS3, ct - off3, SP3, K3, cs, live, BN3, CL3, SL)
    stages = _pick(cph, K0 // (SLOT // BN0), K1 // (SLOT // BN1), K2 // (SLOT // BN2), K3 // (SLOT // BN3))
    cs += 1
    if cs == stages:
        cs = 0
        cph, ct = _seek(cph, ct + G, pid, G, T0, T1, T2, T3)
    return cph, ct, cs


@gluon.jit
def _wait(CNT, idx, target):
    """Spin until counter ``idx`` reaches ``target`` (acquiring loads: what those tasks wrote is then visible)."""
    while gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [CNT + idx], dtype=gl.int32,
                                    is_pure=False, pack=1) < target:  # fmt: skip
        pass
    gl.thread_barrier()


@gluon.jit
def _phase(P: gl.constexpr, ring, xring, j, cph, ct, cs, pid, G, X, Y, Z, z_numel, CNT, prev_tasks, start,
           W0, W1, W2, W3, KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
           BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr,
           CL0: gl.constexpr, CL1: gl.constexpr, CL2: gl.constexpr, CL3: gl.constexpr,
           W, KS, SP, K, count, N, BN: gl.constexpr, CLW: gl.constexpr, CLX: gl.constexpr, TWO: gl.constexpr,
           SL: gl.constexpr, XSL: gl.constexpr, DEPTH: gl.constexpr, XA: gl.constexpr, CROSS: gl.constexpr,
           WAIT: gl.constexpr):  # fmt: skip
    """This program's tasks of phase ``P``: a column tile ``BN`` wide times a split of K each (with ``TWO``, BN/2
    gate rows then BN/2 up rows, whose SiLU(gate) * up makes BN/2 output columns; no split)."""
    BK: gl.constexpr = SLOT // BN
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 2], instr_shape=[16, 8])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    ZL: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
    OUT: gl.constexpr = BN // 2 if TWO else BN
    stages = K // BK
    for t in range(_first(pid, start, G), start + count, G):
        u = t - start
        if P > 0 and WAIT:
            _wait(CNT, P - 1, prev_tasks)
        if z_numel > 0:  # zero this task's share of the buffer the phase two ahead accumulates into
            per = gl.cdiv(z_numel, count)
            for z0 in range(u * per, gl.minimum((u + 1) * per, z_numel), 512):
                rz = z0 + gl.arange(0, 512, layout=ZL)
                gl.store(Z + rz, gl.zeros([512], gl.float32, ZL), mask=rz < gl.minimum((u + 1) * per, z_numel))
        for i in gl.static_range(XA):  # this task's first activation tiles (and, per task, its first weights)
            _copy_x(xring.index(i), X, KS, u, SP, K, i, i < stages, BK, CLX, XSL)
            if not CROSS:
                _copy_w(ring.index((j + i) % DEPTH), W, KS, u, SP, K, i, i < stages, BN, CLW, SL)
            cp.commit_group()
        acc = gl.zeros([32, OUT], gl.float32, MMA)
        acc_u = gl.zeros([32, OUT], gl.float32, MMA)
        for k in range(stages):
            cp.wait_group(XA - 1)
            w = ring.index(j % DEPTH)._reinterpret(gl.bfloat16, [BN, BK], SL)
            x = xring.index(k % XA)._reinterpret(gl.float32, [32, BK], XSL).load(CLX)
            x = gl.convert_layout(x.to(gl.bfloat16), A_L)
            if TWO:
                acc = mma_v2(x, w.slice(0, OUT, 0).permute((1, 0)).load(B_L), acc)
                acc_u = mma_v2(x, w.slice(OUT, OUT, 0).permute((1, 0)).load(B_L), acc_u)
            else:
                acc = mma_v2(x, w.permute((1, 0)).load(B_L), acc)
            gl.thread_barrier()  # every warp is done with both slots before they are refilled
            if CROSS:
                cph, ct, cs = _issue_ahead(ring, j + DEPTH, cph, ct, cs, pid, G, W0, W1, W2, W3,
                                           KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3, K0, K1, K2, K3,
                                           T0, T1, T2, T3, BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3,
                                           SL, DEPTH)  # fmt: skip
            else:
                _copy_w(ring.index((j + XA) % DEPTH), W, KS, u, SP, K, k + XA, k + XA < stages, BN, CLW, SL)
            _copy_x(xring.index(k % XA), X, KS, u, SP, K, k + XA, k + XA < stages, BK, CLX, XSL)
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
    return j, cph, ct, cs


@gluon.jit
def _ring_kernel(X0, Y0, Y1, Y2, Y3, W0, W1, W2, W3, CNT, KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3,
                 K0, K1, K2, K3, T0, T1, T2, T3, N0, N1, N2, N3, Z0, Z1, Z2, Z3, G,
                 BN0: gl.constexpr, BN1: gl.constexpr, BN2: gl.constexpr, BN3: gl.constexpr,
                 CL0: gl.constexpr, CL1: gl.constexpr, CL2: gl.constexpr, CL3: gl.constexpr,
                 CX0: gl.constexpr, CX1: gl.constexpr, CX2: gl.constexpr, CX3: gl.constexpr,
                 DEPTH: gl.constexpr, XA: gl.constexpr, XK: gl.constexpr, CROSS: gl.constexpr,
                 WAIT: gl.constexpr):  # fmt: skip
    pid = gl.program_id(0)
    SL: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    XSL: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    ring = gl.allocate_shared_memory(gl.bfloat16, [DEPTH, SLOT // 512, 512], SL)  # tiles viewed [BN, BK] per phase
    xring = gl.allocate_shared_memory(gl.float32, [XA, 32, XK], XSL)  # XK: the largest K per tile
    off1 = T0
    off2 = off1 + T1
    off3 = off2 + T2
    # the weight cursor: phase, global task index and stage of the next weight tile this program copies
    cph, ct = _seek(pid * 0, _first(pid, 0, G), pid, G, T0, T1, T2, T3)
    cs = 0
    j = 0
    if CROSS:
        for i in gl.static_range(DEPTH):
            cph, ct, cs = _issue_ahead(ring, i, cph, ct, cs, pid, G, W0, W1, W2, W3, KS0, KS1, KS2, KS3,
                                       SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                                       BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3, SL, DEPTH)  # fmt: skip
            cp.commit_group()
    # phase p zeroes, if it is accumulated into, the output of phase p + 2 (mod 4): nobody reads it then
    j, cph, ct, cs = _phase(0, ring, xring, j, cph, ct, cs, pid, G, X0, Y0, Y2, Z2, CNT, 0, 0,
                            W0, W1, W2, W3, KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                            BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3, W0, KS0, SP0, K0, T0, N0, BN0, CL0, CX0, False,
                            SL, XSL, DEPTH, XA, CROSS, WAIT)  # fmt: skip
    j, cph, ct, cs = _phase(1, ring, xring, j, cph, ct, cs, pid, G, Y0, Y1, Y3, Z3, CNT, T0, off1,
                            W0, W1, W2, W3, KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                            BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3, W1, KS1, SP1, K1, T1, N1, BN1, CL1, CX1, True,
                            SL, XSL, DEPTH, XA, CROSS, WAIT)  # fmt: skip
    j, cph, ct, cs = _phase(2, ring, xring, j, cph, ct, cs, pid, G, Y1, Y2, Y0, Z0, CNT, T1, off2,
                            W0, W1, W2, W3, KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                            BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3, W2, KS2, SP2, K2, T2, N2, BN2, CL2, CX2, False,
                            SL, XSL, DEPTH, XA, CROSS, WAIT)  # fmt: skip
    j, cph, ct, cs = _phase(3, ring, xring, j, cph, ct, cs, pid, G, Y2, Y3, Y1, Z1, CNT, T2, off3,
                            W0, W1, W2, W3, KS0, KS1, KS2, KS3, SP0, SP1, SP2, SP3, K0, K1, K2, K3, T0, T1, T2, T3,
                            BN0, BN1, BN2, BN3, CL0, CL1, CL2, CL3, W3, KS3, SP3, K3, T3, N3, BN3, CL3, CX3, False,
                            SL, XSL, DEPTH, XA, CROSS, WAIT)  # fmt: skip
    cp.wait_group(0)
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
    """Launches of :func:`_ring_kernel` for one layer shape and one choice of tiles and splits."""

    def __init__(self, s: dict, bns, splits, depth: int, xa: int, cross: bool, wait: bool = True):
        self.bns, self.depth, self.xa, self.cross, self.wait = tuple(bns), depth, xa, cross, wait
        ks = (s["dq"], s["hidden"], s["inter"], s["hidden"])
        ns = (s["hidden"], 2 * s["inter"], s["hidden"], s["nqkv"])
        self.splits = tuple(1 if p == 1 else sp for p, sp in enumerate(splits))  # gate/up: the activation needs all K
        for n, k, bn, sp in zip(ns, ks, self.bns, self.splits):
            if n % bn or k % (sp * (SLOT_ELEMS // bn)) or SLOT_ELEMS // bn > 512:
                raise ValueError(f"tile {bn} x {sp} splits does not divide the GEMM {n} x {k}")
        self.xk = max(SLOT_ELEMS // bn for bn in self.bns)
        if depth < xa or depth * SLOT_ELEMS * 2 + xa * BM * self.xk * 4 > SHARED:
            raise ValueError(f"depth {depth} and {xa} activation tiles do not fit")
        self.ks_full, self.k_split = ks, tuple(k // sp for k, sp in zip(ks, self.splits))
        self.tasks = tuple(n // bn * sp for n, bn, sp in zip(ns, self.bns, self.splits))
        self.G = torch.cuda.get_device_properties(0).multi_processor_count
        self.cnt = torch.zeros(8, dtype=torch.int32, device="cuda")
        outs = (s["hidden"], s["inter"], s["hidden"], s["nqkv"])
        self.ys = [torch.zeros(BM, n, device="cuda", dtype=torch.float32) for n in outs]
        self.zero = tuple(y.numel() if sp > 1 else 0 for y, sp in zip(self.ys, self.splits))
        self.cl = [_copy_layout(bn, SLOT_ELEMS // bn, 8) for bn in self.bns]
        self.cx = [_copy_layout(BM, SLOT_ELEMS // bn, 4) for bn in self.bns]

    def __call__(self, x0: torch.Tensor, lw: dict) -> list[torch.Tensor]:
        _ring_kernel[(self.G,)](
            x0, *self.ys, lw["o"], lw["gu"], lw["down"], lw["qkv"], self.cnt, *self.ks_full, *self.splits,
            *self.k_split, *self.tasks, *(y.shape[1] for y in self.ys), *self.zero, self.G,
            *self.bns, *self.cl, *self.cx, self.depth, self.xa, self.xk, self.cross, self.wait, num_warps=4,
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


def measure(model: str, bns, splits, depths: list[int], xa: int, bandwidth: float) -> list[dict]:
    from .persistent import shapes, time_layers

    s = shapes(model)
    layers = layer_weights(s, s["layers"], bns[1])
    x0 = torch.randn(BM, s["dq"], device="cuda", dtype=torch.float32)
    weight_bytes = sum(lw.numel() * 2 for k, lw in layers[0].items() if k in ("o", "gu", "down", "qkv"))
    base = dict(model=model, rows=BM, floor_us=weight_bytes / bandwidth * 1e6, tiles=list(bns), splits=list(splits),
                xa=xa)  # fmt: skip
    bufs = [torch.empty(BM, n, device="cuda", dtype=torch.bfloat16) for n in (s["hidden"], 2 * s["inter"],
                                                                               s["hidden"], s["nqkv"])]  # fmt: skip
    xb = x0.bfloat16()
    out = [dict(base, variant="cuBLAS per op", us=time_layers(lambda lw: cublas_chain(xb, lw, bufs), layers))]
    want = reference(x0, layers[0])
    variants = [(d, True, True) for d in depths] + [(max(depths[0], xa), False, True), (depths[-1], True, False)]
    for depth, cross, wait in variants:
        ring = Ring(s, bns, splits, depth, xa, cross, wait)
        if wait:
            for _ in range(2):  # a second launch gives the same: the counters and the accumulated buffers were reset
                got = ring(x0, layers[0])
                for p, (x, y) in enumerate(zip(got, want)):
                    if p == 0 and ring.splits[0] > 1:
                        continue  # phase 2 zeroed it for the next launch
                    err = (x - y).abs().max().item()
                    if err > 0.02 * max(1.0, y.abs().max().item()):
                        raise AssertionError(f"{model} depth {depth} cross {cross}: phase {p} off by {err}")
        if not wait:
            name = f"no waits (streaming only), depth {depth}"
        elif cross:
            name = f"ring, depth {depth}, across tasks"
        else:
            name = f"per-task pipeline, {xa} tiles"
        us = time_layers(lambda lw, ring=ring: ring(x0, lw), layers)
        out.append(dict(base, variant=name, depth=depth, cross=cross, wait=wait, us=us))
    return out


def main(argv: list[str] | None = None) -> int:
    from .run import copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--tiles", default="64,128,64,64", help="BN of the O, gate/up, down and Q/K/V phases")
    ap.add_argument("--splits", default="4,1,4,2", help="splits of K of the same phases (gate/up takes 1)")
    ap.add_argument("--depth", default="4,8,10", help="weight tiles in the ring (16 KB each)")
    ap.add_argument("--xa", type=int, default=3, help="activation tiles in flight within a task")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    bandwidth = copy_bandwidth()
    bns = tuple(int(b) for b in args.tiles.split(","))
    splits = tuple(int(b) for b in args.splits.split(","))
    rows = []
    for model in args.model.split(","):
        rows += measure(model, bns, splits, [int(d) for d in args.depth.split(",")], args.xa, bandwidth)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; µs per layer, the four GEMMs of a decode layer, {BM} rows")
    print("| model | tiles | splits | variant | µs | / floor |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tiles']} | {r['splits']} | {r['variant']} | {r['us']:.1f} | "
              f"{r['us'] / r['floor_us']:.2f}× |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bandwidth, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
