"""Issue 16, the megakernel's first gate: how close to the copy floor can one decode projection's weights stream,
alone and under a warp-specialised GEMM?

Session 20's spike (``bench/ring.py``) streamed a layer's weights through a ring of 16 KB TMA boxes, one program per
SM, the same four warps waiting for each box and doing the tile's work: the weights alone ran at 1.2-1.3x the copy
floor, and each tile's own work added ~35 %. Its note named what a kernel within 15 % of the floor needs: a better
stream, and the work off the stream's path (a producer warp copying, a consumer warpgroup multiplying with wgmma, the
activations as bf16 in shared memory). This bench measures both halves, per projection of a decode layer (32 rows,
bf16, every layer's weights of their own, one CUDA graph over all layers so that none is served from L2):

- ``stream``: a Gluon kernel that only copies the weights into shared memory by TMA, ``depth`` boxes in flight per
  program, one program per task of the GEMM below or ``per_sm`` persistent programs per SM: what the memory system
  gives this many programs;
- ``sum``: a plain Triton kernel reading the same bytes with vector loads, many programs per SM (the ceiling of a
  kernel that does nothing else);
- ``ws``: the warp-specialised GEMM ``y = x @ W^T``: a one-warp partition issues the TMA copies of W's ``[BN, 64]``
  boxes and x's ``[32, 64]`` box into a ring of ``depth`` slots, the default warpgroup multiplies ``W_tile @ x^T``
  by wgmma (the weights as the 64/128-row operand: M=32 is below wgmma's 64) and frees each slot when its product is
  done. K may be split; each split writes float32 partials ``[splits, 32, N]`` that the next kernel would sum (the
  norm that follows O and down reads them in the engine's layout);
- ``cuBLAS``: ``torch.mm`` into bf16, the engine's kernel for these projections today.

Every ``ws`` variant is first checked against a float32 product. Floors use the copy bandwidth of the same run.

    python -m bench.wsgemm --model llama-1b,mistral-3b --json out.json

It needs Gluon as Triton 3.6 spells it (the card's) and a Hopper card.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .ring import report

# Triton 3.6 (the card's) names the TMA load async_copy_global_to_shared; 3.9 (CI's) calls it async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

ROWS = 32  # a decode step's sequences
K_BOX = 64  # K per box: 128 bytes of bf16, the widest swizzled TMA row
BK = gl.constexpr(K_BOX)  # (the kernels' name for it)
SHARED = 227 * 1024


# -- the weights alone ---------------------------------------------------------------------------------------------


@gluon.jit
def _stream_box(desc, t, pid, per_row, tiles_n, stages, i, GEMM_ORDER: gl.constexpr):
    """The coordinates of this program's ``i``-th box: global box ``t`` in row-major order, or (GEMM_ORDER) box ``i``
    of the K range of the GEMM program ``pid`` (row tile ``pid % tiles_n``, split ``pid // tiles_n``)."""
    BR: gl.constexpr = desc.block_type.shape[0]
    BC: gl.constexpr = desc.block_type.shape[1]
    if GEMM_ORDER:
        r = (pid % tiles_n) * BR
        c = ((pid // tiles_n) * stages + i) * BC
    else:
        r = (t // per_row) * BR
        c = (t % per_row) * BC
    return r, c


@gluon.jit
def _stream_kernel(desc, tiles, per_row, G, tiles_n, stages, DEPTH: gl.constexpr, GEMM_ORDER: gl.constexpr):
    """Copy boxes ``pid, pid + G, ...`` of ``desc``'s matrix (or, GEMM_ORDER, the boxes that GEMM program ``pid``
    reads, in its order) into a ring of DEPTH shared-memory slots, each copy issued as soon as its slot's previous
    copy has landed. Nothing reads them: this is the stream that a GEMM's producer could at best keep up."""
    BR: gl.constexpr = desc.block_type.shape[0]
    BC: gl.constexpr = desc.block_type.shape[1]
    pid = gl.program_id(0)
    ring = gl.allocate_shared_memory(desc.dtype, [DEPTH, BR, BC], desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [DEPTH, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(DEPTH):
        mbarrier.init(bars.index(i), count=1)
    if GEMM_ORDER:
        n = stages
    else:
        n = (tiles - pid + G - 1) // G
    for i in gl.static_range(DEPTH):
        r, c = _stream_box(desc, pid + i * G, pid, per_row, tiles_n, stages, i, GEMM_ORDER)
        mbarrier.expect(bars.index(i), desc.block_type.nbytes, pred=i < n)
        _tma_load(desc, [r, c], bars.index(i), ring.index(i), pred=i < n)
    for i in range(n):
        s = i % DEPTH
        mbarrier.wait(bars.index(s), (i // DEPTH) & 1)
        if i + DEPTH < n:
            r, c = _stream_box(desc, pid + (i + DEPTH) * G, pid, per_row, tiles_n, stages, i + DEPTH, GEMM_ORDER)
            mbarrier.expect(bars.index(s), desc.block_type.nbytes)
            _tma_load(desc, [r, c], bars.index(s), ring.index(s))
    for i in gl.static_range(DEPTH):
        mbarrier.invalidate(bars.index(i))


@triton.jit
def _sum_kernel(W, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Each program sums ITERS blocks of BLOCK elements (16-byte vector loads): the plain-load stream."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(W + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc))


# -- the warp-specialised GEMM -------------------------------------------------------------------------------------


@gluon.jit
def _ws_producer(wdesc, xdesc, ring_w, ring_x, ready, empty, xbar, n0, k0, rot, KB, STAGES: gl.constexpr,
                 XONCE: gl.constexpr, XCOPY: gl.constexpr, TILED: gl.constexpr):  # fmt: skip
    """One warp: copy W's box (and x's, unless XONCE copied all of this split's x first, or XCOPY is off) of each K
    stage into the ring, waiting only for the slot to be free. Stage i reads K box ``(i + rot) % STAGES``. TILED: W
    is stored box by box (``[N / BN, KB, BN, 64]``, see :func:`tiled`), so each box is 16 contiguous KB."""
    DEPTH: gl.constexpr = ring_w.type.shape[0]
    BN: gl.constexpr = ring_w.type.shape[1]
    if XONCE:
        mbarrier.expect(xbar, STAGES * xdesc.block_type.nbytes)
        for i in gl.static_range(STAGES):
            _tma_load(xdesc, [0, k0 + i * BK], xbar, ring_x.index(i))
    for i in range(STAGES):
        s = i % DEPTH
        mbarrier.wait(empty.index(s), ((i // DEPTH) & 1) ^ 1)  # a fresh barrier counts as freed once
        k = k0 + ((i + rot) % STAGES) * BK
        if XONCE or not XCOPY:
            mbarrier.expect(ready.index(s), wdesc.block_type.nbytes)
        else:
            mbarrier.expect(ready.index(s), wdesc.block_type.nbytes + xdesc.block_type.nbytes)
            _tma_load(xdesc, [0, k], ready.index(s), ring_x.index(s))
        if TILED:
            _tma_load(wdesc, [(n0 // BN * KB + k // BK) * BN, 0], ready.index(s), ring_w.index(s))
        else:
            _tma_load(wdesc, [n0, k], ready.index(s), ring_w.index(s))


@gluon.jit
def _mma_step(w, x, acc, empty, i, j, INFLIGHT: gl.constexpr):
    """A task's ``i``-th stage (the ring's ``j``-th): ``acc += w @ x^T`` by wgmma with INFLIGHT products left in
    flight, then the slot of the product that is done refilled (stage ``i - INFLIGHT``'s)."""
    acc = warpgroup_mma(w, x.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=INFLIGHT, deps=(acc,))
    if i >= INFLIGHT:
        mbarrier.arrive(empty.index((j - INFLIGHT) % empty.type.shape[0]), count=1)
    return acc


@gluon.jit
def _ws_consumer(ring_w, ring_x, ready, empty, xbar, OUT, n0, split, N, rot, STAGES: gl.constexpr,
                 XONCE: gl.constexpr, INFLIGHT: gl.constexpr, MATH: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
    """The default warpgroup(s): ``acc[BN, 32] += W_tile @ x_tile^T`` per stage by wgmma, INFLIGHT products in
    flight; a slot is freed once the product that read it is done. Writes ``OUT[split, m, n0 + i] = acc[i, m]``."""
    DEPTH: gl.constexpr = ring_w.type.shape[0]
    BN: gl.constexpr = ring_w.type.shape[1]
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 32, 16])  # fmt: skip
    acc = gl.zeros([BN, 32], gl.float32, MMA)
    if XONCE:
        mbarrier.wait(xbar, 0)
    for i in range(STAGES):
        s = i % DEPTH
        mbarrier.wait(ready.index(s), (i // DEPTH) & 1)
        if MATH:
            if XONCE:
                xs = ring_x.index((i + rot) % STAGES)
            else:
                xs = ring_x.index(s)
            acc = _mma_step(ring_w.index(s), xs, acc, empty, i, i, INFLIGHT)
        else:  # the pipeline alone: a slot is free as soon as it has landed
            mbarrier.arrive(empty.index(s), count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    rm = gl.arange(0, 32, layout=gl.SliceLayout(0, MMA))
    gl.store(OUT + split * 32 * N + rm[None, :] * N + rn[:, None], acc.to(OUT.dtype.element_ty))


@gluon.jit
def _ws_gemm_kernel(wdesc, xdesc, OUT, N, KB, DEPTH: gl.constexpr, STAGES: gl.constexpr, XONCE: gl.constexpr,
                    INFLIGHT: gl.constexpr, ROT: gl.constexpr, MATH: gl.constexpr, XCOPY: gl.constexpr,
                    TILED: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """One program per (column tile of BN weight rows, split of K of STAGES boxes). ROT: each program starts its K
    loop at a box of its own (``pid % STAGES``), so that programs do not all read the same activation box at once;
    MATH off: no products (the pipeline alone); XCOPY off (only without MATH): no activation copies."""
    BN: gl.constexpr = wdesc.block_type.shape[0]
    XSLOTS: gl.constexpr = STAGES if XONCE else DEPTH
    pid = gl.program_id(0)
    tiles = N // BN
    n0 = (pid % tiles) * BN
    split = pid // tiles
    rot = 0
    if ROT:
        rot = pid % STAGES
    ring_w = gl.allocate_shared_memory(wdesc.dtype, [DEPTH, BN, BK], wdesc.layout)
    ring_x = gl.allocate_shared_memory(xdesc.dtype, [XSLOTS, 32, BK], xdesc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [DEPTH, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [DEPTH, 1], mbarrier.MBarrierLayout())
    xbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(xbar, count=1)
    for i in gl.static_range(DEPTH):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_ws_consumer, (ring_w, ring_x, ready, empty, xbar, OUT, n0, split, N, rot, STAGES, XONCE, INFLIGHT, MATH,
                        num_warps)),
        (_ws_producer, (wdesc, xdesc, ring_w, ring_x, ready, empty, xbar, n0, split * STAGES * BK, rot, KB, STAGES,
                        XONCE, XCOPY, TILED)),
    ], [1], [24])  # fmt: skip


# -- the host side -------------------------------------------------------------------------------------------------


def _layout(shape):
    return gl.NVMMASharedLayout.get_default_for(list(shape), gl.bfloat16)


class WsGemm:
    """``x [32, K] @ W [N, K]^T`` by :func:`_ws_gemm_kernel`: ``bn`` weight rows per program, ``splits`` of K,
    ``depth`` ring slots, ``inflight`` products in flight, x copied once per program (``xonce``) or per stage, one or
    two consumer warpgroups. Output: bf16 ``[32, N]`` without splits, else float32 partials ``[splits, 32, N]``."""

    def __init__(self, n: int, k: int, bn: int, splits: int, depth: int, inflight: int = 1, xonce: bool = False,
                 warps: int = 4, rot: bool = False, math: bool = True, xcopy: bool = True,
                 tiled: bool = False, maxnreg: int | None = None):  # fmt: skip
        if n % bn or k % (splits * K_BOX):
            raise ValueError(f"{bn} rows and {splits} splits of {K_BOX} do not tile {n} x {k}")
        self.stages = k // splits // K_BOX
        xslots = self.stages if xonce else depth
        if depth * bn * K_BOX * 2 + xslots * ROWS * K_BOX * 2 + 1024 > SHARED or inflight >= depth:
            raise ValueError(f"depth {depth} does not fit")
        if warps == 8 and bn < 128:
            raise ValueError("two warpgroups take 128 rows")
        self.n, self.k, self.bn, self.splits, self.depth = n, k, bn, splits, depth
        self.inflight, self.xonce, self.warps = inflight, xonce, warps
        self.rot, self.math, self.xcopy, self.tiled = rot, math, xcopy or math, tiled
        # registers per thread: a warp-specialised kernel reserves maxnreg for every one of its num_warps + 4 warps
        # (256 by default: the whole register file, one program per SM)
        self.opts = {} if maxnreg is None else {"maxnreg": maxnreg}
        self.grid = (n // bn * splits,)
        dtype = torch.bfloat16 if splits == 1 else torch.float32
        self.out = torch.empty(splits, ROWS, n, device="cuda", dtype=dtype)

    def descriptors(self, w: torch.Tensor, x: torch.Tensor):
        """``w``: ``[N, K]``, or with ``tiled`` its :func:`tiled` form."""
        return (TensorDescriptor.from_tensor(w, [self.bn, K_BOX], _layout([self.bn, K_BOX])),
                TensorDescriptor.from_tensor(x, [ROWS, K_BOX], _layout([ROWS, K_BOX])))  # fmt: skip

    def __call__(self, wdesc, xdesc) -> torch.Tensor:
        _ws_gemm_kernel[self.grid](wdesc, xdesc, self.out, self.n, self.k // K_BOX, self.depth, self.stages,
                                   self.xonce, self.inflight, self.rot, self.math, self.xcopy, self.tiled,
                                   num_warps=self.warps, **self.opts)  # fmt: skip
        return self.out

    def result(self) -> torch.Tensor:
        return self.out[0].float() if self.splits == 1 else self.out.sum(0)


def tiled(w: torch.Tensor, bn: int) -> torch.Tensor:
    """``w [N, K]`` stored box by box: ``[N / bn, K / 64, bn, 64]`` as a ``[N * K / 64, 64]`` matrix, so that each
    ``[bn, 64]`` box a GEMM program reads is one contiguous run of memory."""
    n, k = w.shape
    return w.view(n // bn, bn, k // K_BOX, K_BOX).permute(0, 2, 1, 3).reshape(-1, K_BOX).contiguous()


def projections(model: str) -> dict[str, tuple[int, int]]:
    """N x K of a decode layer's projections (gate and up as one)."""
    from .ring import shapes

    s = shapes(model)
    return dict(qkv=(s["nqkv"], s["hidden"]), o=(s["hidden"], s["dq"]), gate_up=(2 * s["inter"], s["hidden"]),
                down=(s["hidden"], s["inter"]), layers=s["layers"])  # fmt: skip


def splits_for(n: int, k: int, bn: int, sms: int) -> int:
    """The fewest splits of K that give every SM a program (at most K / 256 of them: four boxes a split)."""
    sp = 1
    while n // bn * sp < sms and k % (2 * sp * K_BOX) == 0 and k // (2 * sp) >= 4 * K_BOX:
        sp *= 2
    return sp


def _mm(x, y, w):
    torch.mm(x, w.T, out=y)


def _sum(part, grid, block, iters, w):
    _sum_kernel[(grid,)](w, part, w.numel(), block, iters, num_warps=8)


def _stream(tiles, per_row, programs, depth, desc, tiles_n=1, stages=1, gemm_order=False):
    _stream_kernel[(programs,)](desc, tiles, per_row, programs, tiles_n, stages, depth, gemm_order, num_warps=1)


def _ws(g, descs):
    g(*descs)


def _setup(model: str, name: str, n: int, k: int, layers: int, bandwidth: float):
    """Inputs of one projection (activations, each layer's weights, the floor) and a recorder of timed rows."""
    from .ring import time_layers

    torch.manual_seed(0)
    x = torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(layers)]
    floor = n * k * 2 / bandwidth * 1e6
    rows: list[dict] = []

    def row(variant, fn, inputs, **kw):
        us = time_layers(fn, inputs)
        rows.append(dict(model=model, proj=name, n=n, k=k, floor_us=floor, variant=variant, us=us, **kw))
        print(f"{model} {name} {n}x{k}: {variant}: {us:.2f} us ({us / floor:.2f}x)", flush=True)

    return x, ws, rows, row


def measure_projection(model: str, name: str, n: int, k: int, layers: int, bandwidth: float, depths: list[int],
                       bns: list[int]) -> list[dict]:  # fmt: skip
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x, ws, rows, row = _setup(model, name, n, k, layers, bandwidth)
    row("cuBLAS", partial(_mm, x, torch.empty(ROWS, n, device="cuda", dtype=torch.bfloat16)), ws)
    part = torch.empty(1 << 16, device="cuda", dtype=torch.float32)
    for block, iters in ((2048, 4),):
        grid = triton.cdiv(n * k, block * iters)
        if grid <= part.numel():
            row(f"sum {block}x{iters}", partial(_sum, part, grid, block, iters), [w.view(-1) for w in ws])
    want = x.float() @ ws[0].float().T
    # (inflight, x once, warps, rotated K order, products, activation copies, W stored box by box, maxnreg)
    variants = [(1, False, 4, False, True, True, False, None), (1, False, 4, False, True, True, False, 128),
                (1, False, 4, False, True, True, True, 128), (1, False, 4, False, True, True, False, 80),
                (1, False, 4, False, True, True, True, 80), (1, False, 4, False, False, False, False, 128),
                (2, False, 4, False, True, True, True, 128)]  # fmt: skip
    for bn in (b for b in bns if n % b == 0):
        sp = splits_for(n, k, bn, sms)
        wt = None
        for depth in depths:
            for inflight, xonce, warps, rot, math, xcopy, tile, regs in variants:
                try:
                    g = WsGemm(n, k, bn, sp, depth, inflight, xonce, warps, rot, math, xcopy, tile, regs)
                except ValueError:
                    continue
                if tile and wt is None:
                    wt = [tiled(w, bn) for w in ws]
                descs = [g.descriptors(w, x) for w in (wt if tile else ws)]
                g(*descs[0])
                err = float("nan")
                if math:
                    err = (g.result() - want).abs().max().item()
                    if err > 0.02 * want.abs().max().item():
                        raise AssertionError(f"{model} {name} {vars(g)}: off by {err}")
                what = ("products" if math else "no products") + (
                    ", x per stage" if xcopy and not xonce else ", x once" if xonce else ", no x"
                )
                what += (", rotated" if rot else "") + (", W box by box" if tile else "") + f", maxnreg {regs or 256}"
                what += f", {inflight} in flight" if inflight > 1 else ""
                row(f"ws bn {bn} splits {sp} depth {depth}, {what}", partial(_ws, g), descs, bn=bn, splits=sp,
                    depth=depth, inflight=inflight, xonce=xonce, warps=warps, rot=rot, math=math, xcopy=xcopy,
                    tiled=tile, maxnreg=regs or 256, programs=g.grid[0], max_err=err)  # fmt: skip
        del wt
        # the same programs and ring, copying the weights only: row-major order across programs, or each program
        # its GEMM's boxes in its GEMM's order
        sdescs = [TensorDescriptor.from_tensor(w, [bn, K_BOX], _layout([bn, K_BOX])) for w in ws]
        for depth in depths:
            row(f"stream bn {bn} depth {depth}, {n // bn * sp} programs",
                partial(_stream, n // bn * (k // K_BOX), k // K_BOX, n // bn * sp, depth), sdescs, bn=bn, depth=depth,
                programs=n // bn * sp)  # fmt: skip
            row(f"stream bn {bn} depth {depth}, {n // bn * sp} programs, GEMM order",
                partial(_stream, 0, 0, n // bn * sp, depth, tiles_n=n // bn, stages=k // sp // K_BOX,
                        gemm_order=True), sdescs, bn=bn, depth=depth, programs=n // bn * sp)  # fmt: skip
    sdescs = [TensorDescriptor.from_tensor(w, [128, K_BOX], _layout([128, K_BOX])) for w in ws]
    row("stream persistent, 2 per SM, depth 4", partial(_stream, n // 128 * (k // K_BOX), k // K_BOX, sms * 2, 4),
        sdescs, per_sm=2, depth=4)  # fmt: skip
    return rows


def _mm_norm(x, res, nw, w):
    from acb.kernels.fused import add_rmsnorm

    add_rmsnorm(torch.mm(x, w.T), res, nw, 1e-6)


def _proj(x, p):
    p(x)


def _proj_norm(x, res, nw, p):
    from acb.kernels.fused import add_rmsnorm

    add_rmsnorm(p(x), res, nw, 1e-6)


def measure_engine(model: str, bandwidth: float) -> list[dict]:
    """The engine's projection kernel (acb.kernels.projection) at each split count and ring depth, alone and with
    the norm that sums its partials (add_rmsnorm), against cuBLAS and the norm of its bf16 output: the output and
    down projections of a decode layer, 32 rows."""
    shapes = projections(model)
    layers = shapes.pop("layers")
    return [r for name in ("o", "down") for r in _engine_projection(model, name, *shapes[name], layers, bandwidth)]


def _engine_projection(model: str, name: str, n: int, k: int, layers: int, bandwidth: float) -> list[dict]:
    from acb.kernels.projection import SplitProjection

    x, ws, rows, row = _setup(model, name, n, k, layers, bandwidth)
    res = torch.randn(ROWS, n, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ ws[0].float().T
    row("cuBLAS", partial(_mm, x, torch.empty(ROWS, n, device="cuda", dtype=torch.bfloat16)), ws)
    row("cuBLAS + norm", partial(_mm_norm, x, res, nw), ws)
    for splits in (1, 2, 4, 8):
        for depth in (4, 8, 12):
            try:
                projs = [SplitProjection(w, splits, depth) for w in ws]
            except ValueError:
                continue
            err = (projs[0](x).sum(0) - want).abs().max().item()
            if err > 0.02 * want.abs().max().item():
                raise AssertionError(f"{model} {name} splits {splits} depth {depth}: off by {err}")
            kw = dict(splits=splits, depth=depth, programs=n // projs[0].bn * splits, max_err=err)
            row(f"split projection, {splits} splits, depth {depth}", partial(_proj, x), projs, **kw)
            row(f"split projection + norm, {splits} splits, depth {depth}", partial(_proj_norm, x, res, nw), projs,
                **kw)  # fmt: skip
    return rows


def measure(model: str, bandwidth: float, depths: list[int], bns: list[int]) -> list[dict]:
    shapes = projections(model)
    layers = shapes.pop("layers")
    rows = []
    for name, (n, k) in shapes.items():
        rows += measure_projection(model, name, n, k, layers, bandwidth, depths, bns)
    return rows


def main(argv: list[str] | None = None) -> int:
    from .run import copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--depth", default="4,8,12")
    ap.add_argument("--bn", default="64,128")
    ap.add_argument("--engine", action="store_true", help="the engine's kernel, alone and with the norm after it")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    bandwidth = copy_bandwidth()
    rows = []
    for model in args.model.split(","):
        if args.engine:
            rows += measure_engine(model, bandwidth)
        else:
            rows += measure(model, bandwidth, [int(d) for d in args.depth.split(",")],
                            [int(b) for b in args.bn.split(",")])  # fmt: skip
    print(f"\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s; µs per projection per layer, {ROWS} rows, bf16")
    report(rows, {"model": lambda r: r["model"], "projection": lambda r: f"{r['proj']} {r['n']}x{r['k']}",
                  "variant": lambda r: r["variant"], "µs": lambda r: f"{r['us']:.2f}",
                  "/ floor": lambda r: f"{r['us'] / r['floor_us']:.2f}×"}, bandwidth, args.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
