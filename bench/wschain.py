"""Issue 16, the megakernel's second and third gates: does a warp-specialised weight stream that crosses the
boundaries between a decode layer's GEMMs (gate 2), and then between its layers (gate 3), hide what each GEMM's own
launch costs, and what do the dependencies between the GEMMs cost?

Gate 1 (``bench/wsgemm.py``, session 24) found that a kernel reading one projection's weights takes its floor plus
~2 µs per launch whatever it does, so a layer of one launch per GEMM cannot come within 15 % of its floor. Session
20's ring (``bench/ring.py``) ran the weight stream ahead across the waits between phases in one launch, but its
copies were issued by the same warps that did the products, and it gained nothing. Here the stream has a warp of its
own:

- one persistent launch runs the work between two attentions of a layer as four phases: O, gate/up, down, and the
  next layer's Q/K/V (no norms, no SiLU: the four weights are the bytes; the activation of each phase is the
  previous phase's output, gate/up's first ``inter`` columns standing in for SiLU(gate) * up). With ``launches`` 0
  it runs every layer's four phases (each weight stacked over the layers); a layer's O then reads the first
  columns of the Q/K/V before it and waits for all of it (attention's stand-in);
- a phase is tasks of 64 weight rows times a split of K (``bench.wsgemm``'s tiles); program ``pid`` takes tasks
  ``pid, pid + G, ...`` of every phase in turn;
- a one-warp producer copies each stage's weight box and activation box by TMA into a ring of ``depth`` slots. With
  ``ahead``, it copies a task's first weight boxes *before* it waits for the phase before (a counter of finished
  tiles), so the ring fills with the next phase's weights while the last tiles of this one finish elsewhere;
  without, it waits first (what a launch per phase amounts to, minus the launch);
- the default warpgroup multiplies by wgmma as the engine's split projection does; each split writes its float32
  partial, takes a ticket on its tile, and the last split of a tile sums the partials in order, writes the tile in
  bf16 and counts it finished.

Variants, every layer with its own weights in one CUDA graph (µs per layer; the floor is the four weights at the
copy bandwidth measured in the same run):
- ``one launch`` (``ahead`` or not): the four phases in one launch; ``one launch for every layer`` (launches 0);
- ``a launch per phase``: the same kernel, one phase per launch (the per-op structure with the same GEMM);
- ``cuBLAS``: four ``torch.mm`` per layer;
- ``MODE`` flags (``--modes MODE:launches,...``; :data:`FULL` is the chain) take parts away (the activations'
  copies, the waits, the products, the stores and counts, the tickets, the per-thread fences) or change the way:
  ``TWO_PRODUCERS`` (the weights' producer never waits; with a signal warp), ``BACKOFF`` (spaced polls), ``ROTATE``
  (K orders per program); ``TRACE`` (``--trace``) stamps each program's phases, and every stage of four programs,
  with the global timer; ``--bn 128`` takes 128-row weight tiles. Gate 3's: ``TILE_WAITS`` (a stage waits only for
  the tiles it reads), ``AHEAD_ONCE`` (weights ahead only before a phase's first wait), ``SIGNAL_WARP`` (a warp of
  its own counts), ``RED_SUMS`` (the splits add into float32 outputs: no tickets); ``INFLIGHT2`` (two products in
  flight) and ``--warps 8`` with ``--bn 128`` (two consumer warpgroups, 64 weight rows each). Gate 4's: ``SAME_BOX``
  (every weight box one box hot in L2: the consumer's own pace), ``RAW_X`` (no change of the float32 box to bf16:
  its cost), ``BF16_SUMS`` (``RED_SUMS`` into bf16 outputs: bf16 atomic adds, bf16 boxes multiplied as copied), and
  ``--ahead N`` (how many weight boxes a task copies before its wait; default the ring's depth). Gate 5's:
  ``DYNAMIC`` (tasks claimed from a counter per phase instead of handed out in turn; with ``--splits``, smaller),
  ``BALANCED`` (every program an equal share of each phase's weight boxes, cut at any box; ``--least N``: at least N
  boxes a share), ``WEIGHTED`` (BALANCED with each SM's share in proportion to its pace, from traced runs) and
  ``WAVES`` (BALANCED in blocks of tile waves times K chunks, with TILE_WAITS; ``--waves N``).
- Without stores (``SIGNALS``) nothing reads the products, and ptxas drops most of them (8 of the chain's 32 wgmma
  instructions are left, by ``cuobjdump -sass``): those rows measure the weights' and activations' streams, not the
  products. The least a chain with every product costs is the ``SIGNALS`` row without waits.

Each variant that makes its sums and waits (tickets, or ``RED_SUMS``) is first checked against torch (each phase's
output within 2 % of its largest value; 5 % after every layer in one launch), twice (the tickets and counters reset
themselves).

    python -m bench.wschain --model llama-1b,mistral-3b --depth 6,8 --json out.json

Session 25 (docs/benchmarks.md): one launch streams a layer's weights at 1.06-1.07x the floor (1.27-1.45x with a
launch per phase); with the waits, counts and tickets the chain is 1.47-1.87x, no faster than cuBLAS per GEMM.
Session 26: every layer in one launch, a signal warp and red.add sums: the correct chain is 1.24-1.96x its floor
over the six families (cuBLAS one call per GEMM 1.37-2.45x, same runs). Session 27: the consumer set the pace (0.26
µs a stage even with the weights free, ``SAME_BOX``), for the float32 boxes and their change to bf16; with
``BF16_SUMS`` it takes 0.16 µs a stage and the chain is 1.18-1.70x its floor (1.10-1.28x without waits), at the
price of bf16 roundings in the sums, in any order. The boundaries are what is left: the spread between a phase's
first and last program to finish (1-2 µs), then the polls and the next activation box. Deeper rings, weights
prefetched into L2 during the wait (tried and taken out), fewer boxes ahead, and tasks claimed from a counter
(``DYNAMIC``, 1-2.5 µs a layer slower; smaller tasks slower still) did not shorten them. Session 28: equal shares of
each phase's boxes (``BALANCED``) instead of whole tasks in turn help only where a few programs had a long extra task
(phi3-mini's Q/K/V, 4-5 %) and cost llama-1b 2.5-2.7 µs a layer; the SMs' paces differ by ±3 % and repeat little
from run to run (correlation -0.2 to 0.5), so shares weighed by them (``WEIGHTED``) gain nothing; phases in waves
(``WAVES``, tile waits counting boxes) are 4-45 % slower, also with their polls read early (``POLL_EARLY``) or with
two producers (``TWO_PRODUCERS``): 3-4 times the tasks, each start and end ~0.6 µs or more of the consumer, and
without barriers the programs drift apart.
It needs a Hopper card and Triton's Gluon (3.6 on the card; CI compiles it with 3.9).

The session's best chain (bf16 sums), checked against torch before it is timed:

    python -m bench.wschain --model llama-1b,mistral-3b --per-sm 1,2 --depth 8 --modes 14351:0,145423:0
"""

from __future__ import annotations

import argparse
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .ring import report, shapes, time_layers
from .wsgemm import _layout, _mma_step, _tma_load

_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # (3.9's name)

ROWS = 32  # a decode step's sequences
TILE = (64, 64)  # weight rows x K per box (8 KB); the activation box is [ROWS, 64]
BK = gl.constexpr(TILE[1])
SHARED = 227 * 1024
TMAX = 1024  # the most tiles a phase may have (the tickets' stride)
TMAX_ = gl.constexpr(TMAX)
# MODE, a bit each. The parts of a chain, for taking it apart: the activations' copies, the waits between phases,
# the products, the tiles' stores and counts, the tickets (without them a split phase's sums are not made), and a
# fence of every consumer thread before each count (without it only the counting thread's release orders the stores)
X_LOADS, WAITS, PRODUCTS, SIGNALS, TICKETS, FENCES = (1 << i for i in range(6))
FULL = 63
# ways rather than parts: two producer warps (the weights' never waits), a trace of each program's time stamps per
# phase (:func:`trace`), polls spaced by a sleep, each program's K boxes in an order rotated by its index
TWO_PRODUCERS, TRACE, BACKOFF, ROTATE = (1 << i for i in range(6, 10))
# gate 3: each stage's activation box waits only for the tile of the phase before that it reads (the tile's own
# counter: its splits' counts, or the count of its sum), instead of the whole phase before
TILE_WAITS = 1 << 10
# only a program's first task of a phase copies weight boxes ahead and waits; its later tasks copy each stage's two
# boxes together (the phase before is known done; a tile wait polls after the stage's weight box has gone out)
AHEAD_ONCE = 1 << 11
# a warp of its own counts the tiles (and takes the tickets, and sums the splits): the consumer hands it each stored
# tile through shared memory and goes on to its next task instead of waiting for its release to complete
SIGNAL_WARP = 1 << 12
# split sums without tickets: every phase's output is float32, one per layer, zeroed before the launch; the splits
# add into it (red.add) and count, and the next phase reads it (float32 boxes, made bf16 in shared memory by the
# consumer before each product)
RED_SUMS = 1 << 13
# two products in flight instead of one (a slot is refilled two stages after its product was issued), against a
# consumer no faster than the stream (session 26's reading); session 27: no faster (the float32 boxes were the cause)
INFLIGHT2 = 1 << 14
# gate 4: every weight box is the weight's first (one 8 KB box, hot in L2 for every program): the chain as it would
# run with a free weight stream, so its stage gaps are the consumer's own pace (the sums are wrong: not checked)
SAME_BOX = 1 << 15
# gate 4, the consumer's parts: RED_SUMS without the float32 box's change to bf16 (the products read bf16 boxes never
# filled: the change's cost; not checked)
RAW_X = 1 << 16
# gate 4: RED_SUMS in bf16: the outputs are bf16, the splits add with bf16 red.adds (each sum rounded once a split),
# and the next phase multiplies the copied box as it is (no change to bf16, half the activations' bytes)
BF16_SUMS = 1 << 17
X_LOADS_, WAITS_, PRODUCTS_, SIGNALS_, TICKETS_, FENCES_ = (gl.constexpr(1 << i) for i in range(6))  # (in kernels)
TWO_PRODUCERS_, TRACE_, BACKOFF_, ROTATE_, TILE_WAITS_, AHEAD_ONCE_, SIGNAL_WARP_, RED_SUMS_ = (
    gl.constexpr(1 << i) for i in range(6, 14)
)
# gate 5: tasks handed out from a counter per phase (in TICK, whose tickets RED_SUMS does not use) instead of in
# turn, so that programs on faster SMs take more of them: with more splits than one round needs, a phase ends within
# one small task of its first program. The producer claims each task and tells the consumer through shared memory
# (a task number per ring slot; -1 ends the phase), the consumer tells the signal warp the same way. Session 27:
# correct, and 1-2.5 µs a layer slower (the claims' round trips; smaller tasks were slower still, claimed or not)
DYNAMIC = 1 << 19  # (1 << 18 was session 27's L2_AHEAD, taken out)
# gate 5: every program an equal share of each phase's weight boxes (tile after tile, each tile's K in order), instead
# of whole tasks in turn. A phase's 64-row tiles rarely divide into the programs (qwen2.5-1.5b's gate/up: 280 tiles
# on 132 programs, so 16 programs take three while the mean is 2.1), and the phase ends with its busiest program. A
# program's share may start and end inside a tile: it adds its part of the tile (RED_SUMS), and a tile it has whole
# it stores. ``S_p`` is then how many programs share phase p (``--least``: at least that many boxes each)
BALANCED = 1 << 20
# gate 5: BALANCED with shares weighed by each SM's pace (a program reads its SM's ``[b0, b1)`` of each phase from a
# table at TICK[4 * TMAX + p * SHW + 2 * smid], which :meth:`Chain.weigh` fills from a traced run's paces): SMs do
# not stream equally fast (session 27's traces: 0.19-0.26 µs a stage in one phase), so with equal shares the slowest
# SM ends every phase while the others wait
WEIGHTED = 1 << 21
# gate 5: phases that overlap. Each phase runs in blocks: ``W`` waves of its tiles (all but Q/K/V, whose output the next
# layer's O takes whole) times ``W`` chunks of its K (all but O, whose input is the whole Q/K/V), wave-major, every
# program an equal share of every block (BALANCED within a block). With TILE_WAITS each box waits for the tile of the
# phase before that it reads, counted in boxes, so a program's first block of a phase needs only the first wave of
# the phase before, done long before, and the last wave is needed only a block or more later: the spread between the
# programs' ends of a phase falls inside the next phase's stream. gate/up's waves hold gate and up tiles in pairs (down
# reads both). ``S_p`` is then ``W``
WAVES = 1 << 22
# gate 5, with WAVES: a task's tile counters are read (relaxed) before its first two weight boxes go out and looked
# at after them, then fenced (acquire, and the async proxy), so that the poll's round trip no longer stops the
# producer at every task's start
POLL_EARLY = 1 << 23
SHW = 512  # int32s of a phase's share table: (b0, b1) for 256 SMs
SHW_ = gl.constexpr(SHW)
INFLIGHT2_, SAME_BOX_, RAW_X_, BF16_SUMS_ = (gl.constexpr(1 << i) for i in range(14, 18))
DYNAMIC_, BALANCED_, WEIGHTED_ = gl.constexpr(DYNAMIC), gl.constexpr(BALANCED), gl.constexpr(WEIGHTED)
WAVES_, POLL_EARLY_ = gl.constexpr(WAVES), gl.constexpr(POLL_EARLY)
SPAN = 64  # TILE_WAITS: the most stages a task may have (one poll reads all their tiles' counters)
SPAN_ = gl.constexpr(SPAN)
CNT_STRIDE = 32  # int32s between two counters: each on a line of its own
CNT_STRIDE_ = gl.constexpr(CNT_STRIDE)
TRACE_AT = 8 * CNT_STRIDE  # the trace's first int32 in the counters' buffer
TRACE_AT_ = gl.constexpr(TRACE_AT)
TRACED = 4  # TRACE also stamps every stage of four programs (the first two, the middle one, the last one)
MAXIT = 1024  # ... up to this many stages each
STAGES_AT = TRACE_AT + 1024 * 4 * 3 * 2  # (int32s; room for the per-phase stamps of 1,024 programs)
STAGES_AT_, MAXIT_ = gl.constexpr(STAGES_AT), gl.constexpr(MAXIT)
_LD_ACQUIRE = gl.constexpr("ld.acquire.gpu.global.b32 $0, [$1];")
_LD_RELAXED = gl.constexpr("ld.relaxed.gpu.global.b32 $0, [$1];")
SMID_AT = STAGES_AT + TRACED * MAXIT * 2  # TRACE: each program's SM (int32s, 1,024 programs)
SMID_AT_ = gl.constexpr(SMID_AT)


@gluon.jit
def _fence_after_wait(CNT, idx, target, MODE: gl.constexpr):
    """Spin until counter ``idx`` reaches ``target``, then order the TMA copies issued next after what was counted
    (acquiring loads, then a proxy fence: the tiles were written by plain stores, the copies read them by TMA)."""
    ptr = CNT + idx * CNT_STRIDE_
    while gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=gl.int32,
                                    is_pure=False, pack=1) < target:  # fmt: skip
        if (MODE & BACKOFF_) != 0:
            gl.inline_asm_elementwise("nanosleep.u32 128; mov.u32 $0, 0;", "=r,l", [ptr], dtype=gl.int32,
                                      is_pure=False, pack=1)  # fmt: skip
    gl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r,l", [ptr], dtype=gl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _stamp(CNT, pid, P, k):
    """TRACE: the global timer (ns) as stamp ``k`` of program ``pid`` in phase ``P``: 0 its first stage ready, 1
    its last task counted, 2 its wait for the phase before over."""
    t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [CNT], dtype=gl.int64, is_pure=False, pack=1)
    gl.store((CNT + TRACE_AT_).to(gl.pointer_type(gl.int64)) + (pid * 4 + P) * 3 + k, t)


@gluon.jit
def _stamp_stage(CNT, pid, G, j):
    """TRACE: the global timer (ns) when the program's ``j``-th stage (counted across phases) was ready, for the
    four traced programs."""
    sel = gl.where(pid == 0, 0, gl.where(pid == 1, 1, gl.where(pid == G // 2, 2, gl.where(pid == G - 1, 3, -1))))
    if sel >= 0 and j < MAXIT_:
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [CNT], dtype=gl.int64, is_pure=False,
                                      pack=1)  # fmt: skip
        gl.store((CNT + STAGES_AT_).to(gl.pointer_type(gl.int64)) + sel * MAXIT_ + j, t)


@gluon.jit
def _fence_gpu(CNT):
    """Every thread: its stores before what it does next, for the whole GPU, plain and TMA readers alike."""
    gl.inline_asm_elementwise("fence.proxy.async.global; fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,l", [CNT],
                              dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _tasks(pid, tiles, S, stages, G, SH, blk, PH: gl.constexpr, MODE: gl.constexpr):
    """A program's tasks of a phase, as ``range(lo, hi, step)``: in turn, tasks ``pid, pid + G, ...`` of ``tiles *
    S``; BALANCED, the tiles that its share of the phase's boxes touches (``S`` programs share them, ``stages``
    boxes a tile); WAVES, of block ``blk``'s boxes (tiles counted from the block's first)."""
    lo = pid
    hi = tiles * S
    step = G
    if (MODE & BALANCED_) != 0:
        b0, b1 = _share(pid, tiles, S, stages, G, SH, blk, PH, MODE)
        kc = _block(tiles, S, stages, blk, PH, MODE)[3]
        lo = b0 // kc
        hi = gl.where(b1 > b0, (b1 + kc - 1) // kc, lo)
        step = G * 0 + 1
    return lo, hi, step


@gluon.jit
def _blocks(W, PH: gl.constexpr):
    """WAVES: phase PH's blocks: its waves (1 for Q/K/V) times its chunks of K (1 for O)."""
    return (1 if PH == 3 else W) * (1 if PH == 0 else W)


@gluon.jit
def _block(tiles, S, stages, blk, PH: gl.constexpr, MODE: gl.constexpr):
    """Block ``blk`` of a phase: its first tile position, its first box of K, its tiles and its boxes a tile (the
    whole phase without WAVES)."""
    p0 = blk * 0
    k0 = blk * 0
    tb = tiles
    kc = stages
    if (MODE & WAVES_) != 0:
        C = 1 if PH == 0 else S
        tb = tiles // (1 if PH == 3 else S)
        kc = stages // C
        p0 = (blk // C) * tb
        k0 = (blk % C) * kc
    return p0, k0, tb, kc


@gluon.jit
def _share(pid, tiles, S, stages, G, SH, blk, PH: gl.constexpr, MODE: gl.constexpr):
    """BALANCED: the program's share of a phase's ``tiles * stages`` boxes, ``[b0, b1)`` (empty from pid ``S``);
    WEIGHTED: its SM's, from the phase's table ``SH``; WAVES: of block ``blk``'s boxes (every program a share)."""
    total = tiles * stages
    b0 = gl.where(pid < S, pid, S) * total // S
    b1 = gl.where(pid + 1 < S, pid + 1, S) * total // S
    if (MODE & WAVES_) != 0:
        _, _, tb, kc = _block(tiles, S, stages, blk, PH, MODE)
        b0 = pid * (tb * kc) // G
        b1 = (pid + 1) * (tb * kc) // G
    if (MODE & WEIGHTED_) != 0:
        sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,l", [SH], dtype=gl.int32, is_pure=True, pack=1)
        b0 = gl.load(SH + 2 * sm)
        b1 = gl.load(SH + 2 * sm + 1)
    return b0, b1


@gluon.jit
def _task(t, pid, tiles, S, stages, G, SH, blk, BN: gl.constexpr, PH: gl.constexpr, MODE: gl.constexpr):
    """Task ``t`` of a phase: its first weight row, its first K column, how far its K boxes are rotated (ROTATE:
    by the program's index, so that programs in step read different boxes; else 0), and its stages (``stages``;
    BALANCED: the part of tile ``t`` in the program's share; WAVES: of block ``blk``'s tile ``t``)."""
    rot = pid * 0
    if (MODE & ROTATE_) != 0:
        rot = pid % stages
    kb = (t // tiles) * stages
    n = stages
    tile = t % tiles
    if (MODE & BALANCED_) != 0:
        b0, b1 = _share(pid, tiles, S, stages, G, SH, blk, PH, MODE)
        p0, k0, _, kc = _block(tiles, S, stages, blk, PH, MODE)
        kb = gl.where(b0 > t * kc, b0 - t * kc, 0)
        n = gl.where(b1 < (t + 1) * kc, b1 - t * kc, kc) - kb
        kb += k0
        tile = p0 + t
        if (MODE & WAVES_) != 0 and PH == 1:  # (gate/up: gate and up tiles in pairs)
            tile = tile // 2 + (tile % 2) * (tiles // 2)
    return tile * BN, kb * BK, rot, n


@gluon.jit
def _k(k0, i, rot, stages):
    """The K column of a task's stage ``i``."""
    return k0 + ((i + rot) % stages) * BK


@gluon.jit
def _wait_for(CNT, pid, target, WAIT_ON: gl.constexpr, MODE: gl.constexpr):
    """A task's wait for ``target`` counts of phase WAIT_ON (none for the launch's first phase, or without WAITS),
    stamped when over (TRACE)."""
    if WAIT_ON >= 0 and (MODE & WAITS_) != 0:
        _fence_after_wait(CNT, WAIT_ON, target, MODE)
        if (MODE & TRACE_) != 0 and WAIT_ON < 3:  # (a later layer's first phase waits on the last: not stamped)
            _stamp(CNT, pid, WAIT_ON + 1, 2)


@gluon.jit
def _ready_upto(TC, k0, rot, stages, target, twin, BN: gl.constexpr):
    """TILE_WAITS: the first of a task's stages whose activation box is not ready yet (``SPAN`` when all are): the
    box at column ``k`` is made from the tile ``k // BN`` of the phase before and its ``twin`` (the tile ``twin``
    further: down's box of SiLU(gate) * up needs a gate tile and an up tile; 0 for none), each ready when its
    counter in ``TC`` reaches ``target``. Two acquiring loads per stage, all in one round trip."""
    r, live, v, v2 = _poll(TC, k0, rot, stages, twin, BN, False)
    return _upto(r, live, v, v2, target)


@gluon.jit
def _poll(TC, k0, rot, stages, twin, BN: gl.constexpr, RELAXED: gl.constexpr):
    """:func:`_ready_upto`'s loads (relaxed: POLL_EARLY's, read before they are looked at)."""
    r = gl.arange(0, SPAN_, layout=gl.BlockedLayout([SPAN_ // 32], [32], [1], [0]))
    live = r < stages
    col = k0 + ((gl.where(live, r, 0) + rot) % stages) * BK
    ptrs = TC + col // BN
    LD: gl.constexpr = _LD_RELAXED if RELAXED else _LD_ACQUIRE
    v = gl.inline_asm_elementwise(LD, "=r,l", [ptrs], dtype=gl.int32, is_pure=False, pack=1)
    v2 = gl.inline_asm_elementwise(LD, "=r,l", [ptrs + twin], dtype=gl.int32, is_pure=False, pack=1)
    return r, live, v, v2


@gluon.jit
def _upto(r, live, v, v2, target):
    """:func:`_ready_upto` from its loads."""
    return gl.min(gl.where(live & ((v < target) | (v2 < target)), r, SPAN_), axis=0)


@gluon.jit
def _wait_for_stage(TC, CNT, pid, first, i, k0, rot, stages, target, twin, P: gl.constexpr, BN: gl.constexpr,
                    MODE: gl.constexpr):  # fmt: skip
    """TILE_WAITS: spin until stage ``i`` of the task is ready (:func:`_ready_upto`), then order the TMA copies
    issued next after what the lanes acquired (the warp's barrier, then a proxy fence); returns how many leading
    stages are known ready. Stamped (TRACE) when the phase's first task may start."""
    upto = _ready_upto(TC, k0, rot, stages, target, twin, BN)
    while upto <= i:
        if (MODE & BACKOFF_) != 0:
            gl.inline_asm_elementwise("nanosleep.u32 128; mov.u32 $0, 0;", "=r,l", [TC], dtype=gl.int32,
                                      is_pure=False, pack=1)  # fmt: skip
        upto = _ready_upto(TC, k0, rot, stages, target, twin, BN)
    gl.inline_asm_elementwise("bar.warp.sync -1; fence.proxy.async.global; mov.u32 $0, 0;", "=r,l", [TC],
                              dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip
    if (MODE & TRACE_) != 0:
        if first and i == 0:
            _stamp(CNT, pid, P, 2)
    return upto


@gluon.jit
def _produce(wdesc, xdesc, ring_w, ring_x, ready, empty, dyn, CNT, TICK, it, q, pid, G, layer, xrow, tiles, S, stages,
             pre, target, twin, P: gl.constexpr, WAIT_ON: gl.constexpr, MODE: gl.constexpr,
             COPIES: gl.constexpr):  # fmt: skip
    """One phase of layer ``layer``'s copies for this program: for each task, the weight boxes of its first ``pre``
    stages, then (if this launch ran the phase ``WAIT_ON`` before) the wait for that phase's tiles, then the
    activation boxes of those stages (from row ``xrow``: RED_SUMS keeps a layer's activations in rows of their own),
    then both boxes of every later stage as slots free up. With TILE_WAITS each
    activation box of phases 1-3 waits only for its own tiles of the phase before (``MODE``: see :data:`FULL`); the
    output projection of a later layer waits for the whole Q/K/V before it (attention's stand-in). DYNAMIC: the
    tasks are claimed from phase ``P``'s counter (``q``: a claim made at the layer before's end, or -1) and the
    phase ends with a slot of task -1; returns the ring's position and the claim kept for the next layer."""
    depth: gl.constexpr = ring_w.type.shape[0]
    TC = TICK + (4 + WAIT_ON) * TMAX_  # the tile counters of the phase before
    if (MODE & DYNAMIC_) != 0:
        n = tiles * S
        if q < 0:  # (no claim kept from the layer before)
            q = gl.atomic_add(TICK + P * TMAX_, 1, sem="relaxed")
        k = pid * 0
        while q < (layer + 1) * n:  # (a claim past this layer's tasks is kept for the next layer)
            it = _produce_task(wdesc, xdesc, ring_w, ring_x, ready, empty, dyn, CNT, TC, TC, it, pid, q - layer * n,
                               k == 0, layer, xrow, tiles, S, stages, G, pid * 0, pre, target, twin, P, WAIT_ON,
                               MODE, COPIES)  # fmt: skip
            k += 1
            q = gl.atomic_add(TICK + P * TMAX_, 1, sem="relaxed")
        s = it % depth  # the phase's end: a slot with no copies, task -1
        mbarrier.wait(empty.index(s), ((it // depth) & 1) ^ 1)
        _put(dyn, s, -1)
        mbarrier.arrive(ready.index(s), count=1)
        it += 1
    else:
        SH = TICK + 4 * TMAX_ + P * SHW_  # (WEIGHTED's shares)
        if (MODE & WAVES_) != 0:
            for blk in range(_blocks(S, P)):
                it = _produce_block(wdesc, xdesc, ring_w, ring_x, ready, empty, dyn, CNT, TC, SH, it, pid, G, layer,
                                    xrow, tiles, S, stages, blk, pre, target, twin, P, WAIT_ON, MODE,
                                    COPIES)  # fmt: skip
        else:
            it = _produce_block(wdesc, xdesc, ring_w, ring_x, ready, empty, dyn, CNT, TC, SH, it, pid, G, layer, xrow,
                                tiles, S, stages, pid * 0, pre, target, twin, P, WAIT_ON, MODE, COPIES)  # fmt: skip
    return it, q


@gluon.jit
def _produce_block(wdesc, xdesc, ring_w, ring_x, ready, empty, dyn, CNT, TC, SH, it, pid, G, layer, xrow, tiles, S,
                   stages, blk, pre, target, twin, P: gl.constexpr, WAIT_ON: gl.constexpr, MODE: gl.constexpr,
                   COPIES: gl.constexpr):  # fmt: skip
    """:func:`_produce`'s tasks in turn, or of its share (of block ``blk``: WAVES)."""
    lo, hi, step = _tasks(pid, tiles, S, stages, G, SH, blk, P, MODE)
    for t in range(lo, hi, step):
        it = _produce_task(wdesc, xdesc, ring_w, ring_x, ready, empty, dyn, CNT, TC, SH, it, pid, t,
                           (blk == 0) & (t == lo), layer, xrow, tiles, S, stages, G, blk, pre, target, twin, P,
                           WAIT_ON, MODE, COPIES)  # fmt: skip
    return it


@gluon.jit
def _produce_task(wdesc, xdesc, ring_w, ring_x, ready, empty, dyn, CNT, TC, SH, it, pid, t, first, layer, xrow, tiles,
                  S, stages, G, blk, pre, target, twin, PH: gl.constexpr, WAIT_ON: gl.constexpr, MODE: gl.constexpr,
                  COPIES: gl.constexpr):  # fmt: skip
    """:func:`_produce`'s task ``t`` (``first``: the program's first of the phase). DYNAMIC: its number goes to the
    consumer with its first stage's slot. ``COPIES``: both boxes of each stage (0), or with TWO_PRODUCERS the weight
    boxes alone (1: never waits for another phase) or the activation boxes alone (2: the waits)."""
    depth: gl.constexpr = ring_w.type.shape[0]
    BN: gl.constexpr = wdesc.block_type.shape[0]
    X: gl.constexpr = (MODE & X_LOADS_) != 0 and COPIES != 1
    XB: gl.constexpr = xdesc.block_type.nbytes if X else 0
    nbytes: gl.constexpr = (wdesc.block_type.nbytes if COPIES != 2 else 0) + XB
    WAITS: gl.constexpr = WAIT_ON >= 0 and (MODE & WAITS_) != 0 and COPIES != 1
    TILED: gl.constexpr = WAITS and WAIT_ON < 3 and (MODE & TILE_WAITS_) != 0
    ONCE: gl.constexpr = (MODE & AHEAD_ONCE_) != 0
    KEEP: gl.constexpr = 0 if (MODE & SAME_BOX_) != 0 else 1  # (SAME_BOX: every weight box at [0, 0])
    DYN: gl.constexpr = (MODE & DYNAMIC_) != 0
    EARLY: gl.constexpr = TILED and (MODE & POLL_EARLY_) != 0
    n0, k0, rot, stages = _task(t, pid, tiles, S, stages, G, SH, blk, BN, PH, MODE)  # (BALANCED: its own stages)
    n0 += layer * tiles * BN  # (each weight is every layer's, stacked)
    ahead = pre
    if (MODE & BALANCED_) != 0:
        ahead = gl.where(stages < pre, stages, pre)
    if ONCE:
        ahead = gl.where(first and WAITS, ahead, 0)
    if EARLY:  # the counters read now, looked at once the first two weight boxes (at least) are out
        r, live, v, v2 = _poll(TC, k0, rot, stages, twin, BN, True)
        ahead = gl.where(ahead < 2, gl.where(stages < 2, stages, 2), ahead)
    if COPIES != 0:  # (two producers: each copies its boxes as slots free up; only the activations' producer waits)
        ahead = pid * 0
    for i in range(ahead):
        j = it + i
        s = j % depth
        mbarrier.wait(empty.index(s), ((j // depth) & 1) ^ 1)  # a fresh barrier counts as freed once
        if DYN:
            if i == 0:
                _put(dyn, s, t)
        mbarrier.expect(ready.index(s), nbytes)  # the slot completes when the activation box lands too
        _tma_load(wdesc, [n0 * KEEP, _k(k0, i, rot, stages) * KEEP], ready.index(s), ring_w.index(s))
    if not TILED and COPIES != 1:
        if first or not ONCE:
            _wait_for(CNT, pid, target, WAIT_ON, MODE)
    upto = pid * 0
    if EARLY:
        upto = _upto(r, live, v, v2, target)
        if upto > 0:  # (what the relaxed loads saw, acquired, for the copies too)
            gl.inline_asm_elementwise("fence.acq_rel.gpu; bar.warp.sync -1; fence.proxy.async.global; mov.u32 $0, 0;",
                                      "=r,l", [TC], dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip
            if (MODE & TRACE_) != 0:  # (the phase's wait is over here when the early poll saw its tiles done)
                if first:
                    _stamp(CNT, pid, WAIT_ON + 1, 2)
    for i in range(stages):
        j = it + i
        s = j % depth
        if i >= ahead:
            mbarrier.wait(empty.index(s), ((j // depth) & 1) ^ 1)
            if DYN:
                if i == 0:
                    _put(dyn, s, t)
            mbarrier.expect(ready.index(s), nbytes)
            if COPIES != 2:
                _tma_load(wdesc, [n0 * KEEP, _k(k0, i, rot, stages) * KEEP], ready.index(s), ring_w.index(s))
        if TILED:
            if i >= upto:
                upto = _wait_for_stage(TC, CNT, pid, first, i, k0, rot, stages, target, twin, WAIT_ON + 1, BN,
                                       MODE)  # fmt: skip
        if X:
            _tma_load(xdesc, [xrow, _k(k0, i, rot, stages)], ready.index(s), ring_x.index(s))
    it += stages
    return it


@gluon.jit
def _put(dyn, i, v):
    """DYNAMIC: ``dyn[i] = v`` (a task's number, or -1), in shared memory."""
    L: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    dyn.index(i).store(gl.full([1], v, gl.int32, L))


@gluon.jit
def _get(dyn, i):
    """DYNAMIC: ``dyn[i]``."""
    L: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    return gl.max(dyn.index(i).load(L), axis=0)


@gluon.jit
def _count(CNT, TICK, tile, n, P: gl.constexpr, MODE: gl.constexpr):
    """A tile of phase ``P`` is done (or one of its splits, without tickets): its phase's counter, or with
    TILE_WAITS its own (``TICK``'s second half), released after its stores; WAVES counts a tile's ``n`` boxes."""
    if (MODE & TILE_WAITS_) != 0:
        gl.atomic_add(TICK + (4 + P) * TMAX_ + tile, n, sem="release")
    if (MODE & TILE_WAITS_) == 0 or P == 3:  # (the next layer's output projection waits for the whole of Q/K/V)
        gl.atomic_add(CNT + P * CNT_STRIDE_, 1, sem="release")


@gluon.jit
def _consume(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, OUT, PART, TICK, CNT, it, nt, pid, G, ly, tiles, S,
             stages, N, P: gl.constexpr, MODE: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """One phase's products for this program: ``acc[BN, ROWS] = W_tile @ x^T`` over the task's stages; then the
    tile in bf16 (one split), or the partial and a ticket, the last split of a tile summing all of them in order.
    ``MODE`` (see :data:`FULL`) takes parts away: without products each slot is freed as soon as it has landed;
    without tickets each split counts itself done (the sums are not made). With SIGNAL_WARP the counts, tickets and
    sums are :func:`_signal`'s: the consumer hands each stored tile over (``stored``, its ``nt``-th task) and goes on.
    DYNAMIC: each task's number comes with its first slot, until a slot of task -1 (passed on to the signal warp).
    Returns the stages and tasks consumed so far."""
    depth: gl.constexpr = ring_w.type.shape[0]
    if (MODE & DYNAMIC_) != 0:
        k = pid * 0
        t = pid * 0
        while t >= 0:
            s = it % depth
            mbarrier.wait(ready.index(s), (it // depth) & 1)
            t = _get(dyn, s)
            if t >= 0:
                it, nt = _consume_task(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, OUT, PART, TICK, CNT, it,
                                       nt, pid, G, ly, t, k == 0, tiles, S, stages, N, P, MODE, num_warps)  # fmt: skip
                k += 1
            else:
                mbarrier.arrive(empty.index(s), count=1)
                it += 1
                _hand_over(stored, freed, dyn, nt, -1, MODE)
                nt += 1
    else:
        SH = TICK + 4 * TMAX_ + P * SHW_
        if (MODE & WAVES_) != 0:
            for blk in range(_blocks(S, P)):
                it, nt = _consume_block(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, OUT, PART, TICK, CNT, SH,
                                        it, nt, pid, G, ly, tiles, S, stages, N, blk, P, MODE, num_warps)  # fmt: skip
        else:
            it, nt = _consume_block(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, OUT, PART, TICK, CNT, SH, it,
                                    nt, pid, G, ly, tiles, S, stages, N, pid * 0, P, MODE, num_warps)  # fmt: skip
    return it, nt


@gluon.jit
def _consume_block(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, OUT, PART, TICK, CNT, SH, it, nt, pid, G, ly,
                   tiles, S, stages, N, blk, P: gl.constexpr, MODE: gl.constexpr,
                   num_warps: gl.constexpr):  # fmt: skip
    """:func:`_consume`'s tasks in turn, or of its share (of block ``blk``: WAVES)."""
    lo, hi, step = _tasks(pid, tiles, S, stages, G, SH, blk, P, MODE)
    for t in range(lo, hi, step):
        St = S
        n = stages
        tile = t
        if (MODE & BALANCED_) != 0:  # (a tile the program has whole is stored, a part of one added)
            tile, _, _, n = _task(t, pid, tiles, S, stages, G, SH, blk, 1, P, MODE)
            St = gl.where(n == stages, 1, 2)
        it, nt = _consume_task(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, OUT, PART, TICK, CNT, it, nt,
                               pid, G, ly, tile, (blk == 0) & (t == lo), tiles, St, n, N, P, MODE,
                               num_warps)  # fmt: skip
    return it, nt


@gluon.jit
def _hand_over(stored, freed, dyn, nt, tile, MODE: gl.constexpr):
    """SIGNAL_WARP: the consumer's ``nt``-th task (its tile's stores done by every thread) to the signal warp, through
    one of two hand-over barriers; DYNAMIC: with its tile (-1: the phase's end) in ``dyn``'s last two slots."""
    mbarrier.wait(freed.index(nt % 2), ((nt // 2) & 1) ^ 1)
    if (MODE & DYNAMIC_) != 0:
        _put(dyn, dyn.type.shape[0] - 2 + nt % 2, tile)
        _barrier()
    mbarrier.arrive(stored.index(nt % 2), count=1)


@gluon.jit
def _consume_task(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, OUT, PART, TICK, CNT, it, nt, pid, G, ly, t,
                  first, tiles, S, stages, N, P: gl.constexpr, MODE: gl.constexpr,
                  num_warps: gl.constexpr):  # fmt: skip
    """:func:`_consume`'s task ``t`` (``first``: the program's first of the phase)."""
    depth: gl.constexpr = ring_w.type.shape[0]
    BN: gl.constexpr = ring_w.type.shape[1]
    R: gl.constexpr = ring_x.type.shape[1]
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    rn = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    rm = gl.arange(0, R, layout=gl.SliceLayout(0, MMA))
    offs = rm[None, :] * N + rn[:, None]
    RED: gl.constexpr = (MODE & RED_SUMS_) != 0
    XL: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])  # (RED: a float32 box in registers)
    FLIGHT: gl.constexpr = 2 if (MODE & INFLIGHT2_) != 0 else 1  # products in flight
    NXS: gl.constexpr = xs.type.shape[0]
    tile = t % tiles
    split = t // tiles
    acc = gl.zeros([BN, R], gl.float32, MMA)
    for i in range(stages):
        j = it + i
        s = j % depth
        mbarrier.wait(ready.index(s), (j // depth) & 1)
        if (MODE & TRACE_) != 0:
            if first and i == 0:
                _stamp(CNT, pid, P, 0)
            _stamp_stage(CNT, pid, G, j)
        if (MODE & PRODUCTS_) == 0:
            mbarrier.arrive(empty.index(s), count=1)
        else:
            if RED and (MODE & BF16_SUMS_) == 0:  # the box in bf16, in one of FLIGHT + 1 buffers (the products
                # in flight read the others)
                xb = xs.index(j % NXS)
                if (MODE & RAW_X_) == 0:
                    xb.store(ring_x.index(s).load(XL).to(gl.bfloat16))
                    fence_async_shared()
                    _barrier()
            else:
                xb = ring_x.index(s)
            acc = _mma_step(ring_w.index(s), xb, acc, empty, i, j, FLIGHT)
    it += stages
    if (MODE & PRODUCTS_) != 0:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((it - 1) % depth), count=1)
        if FLIGHT == 2:  # (a task has 2+ stages: the host checks)
            mbarrier.arrive(empty.index((it - 2) % depth), count=1)
    if (MODE & SIGNALS_) != 0:
        tile_out = OUT + tile * BN + offs
        if RED:  # this layer's rows of the float32 (BF16_SUMS: bf16) output: the split's product stored, or added
            # (four consecutive columns a thread: one 16-byte (8-byte) red.add, not four)
            RL: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, num_warps], [0, 1])
            vn = gl.arange(0, BN, layout=gl.SliceLayout(1, RL))
            vm = gl.arange(0, R, layout=gl.SliceLayout(0, RL))
            dst = OUT + (ly * R + vm[None, :]) * N + tile * BN + vn[:, None]
            if S == 1:  # (BF16_SUMS: bf16)
                gl.store(dst, gl.convert_layout(acc, RL).to(OUT.dtype.element_ty))
            else:
                gl.atomic_add(dst, gl.convert_layout(acc, RL).to(OUT.dtype.element_ty), sem="relaxed")
        elif S == 1:
            gl.store(tile_out, acc.to(gl.bfloat16))
        else:
            gl.store(PART + split * R * N + tile * BN + offs, acc)  # (PART: this phase's own)
        if (MODE & FENCES_) != 0:
            _fence_gpu(CNT)
        _barrier()
        if (MODE & SIGNAL_WARP_) != 0:  # (the barrier orders every thread's stores before the hand-over)
            _hand_over(stored, freed, dyn, nt, tile, MODE)
        elif S == 1 or (MODE & TICKETS_) == 0:
            _count(CNT, TICK, tile, 1, P, MODE)
        else:
            ticket = gl.atomic_add(TICK + P * TMAX_ + tile, 1, sem="acq_rel")
            if ticket == S - 1:  # the tile's last split: the sum of all of them, in order
                if (MODE & FENCES_) != 0:
                    _fence_gpu(CNT)
                total = gl.zeros([BN, R], gl.float32, MMA)
                for sp in range(S):
                    total += gl.load(PART + sp * R * N + tile * BN + offs, cache_modifier=".cg")
                gl.store(tile_out, total.to(gl.bfloat16))
                gl.store(TICK + P * TMAX_ + tile, 0)  # for the next launch
                if (MODE & FENCES_) != 0:
                    _fence_gpu(CNT)
                _barrier()
                _count(CNT, TICK, tile, 1, P, MODE)
    if (MODE & TRACE_) != 0 and (MODE & SIGNAL_WARP_) == 0:
        _stamp(CNT, pid, P, 1)
    nt += 1
    return it, nt


@gluon.jit
def _signal(stored, freed, dyn, OUT, PART, TICK, CNT, nt, pid, G, tiles, S, stages, N, R: gl.constexpr,
            BN: gl.constexpr, P: gl.constexpr, MODE: gl.constexpr):  # fmt: skip
    """SIGNAL_WARP: one phase's counts for this program, in the consumer's order: for each task, once the consumer
    has stored its tile (or partial), the tile's count, or the split's ticket and, for a tile's last split, the sum
    of its splits in order (eight rows at a time), then the count. DYNAMIC (no tickets): each task's tile comes with
    it, until the phase's end (-1). Returns the tasks signalled so far."""
    L: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [1, 1], [1, 0])
    rows = gl.arange(0, 8, layout=gl.SliceLayout(1, L))
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, L))
    if (MODE & DYNAMIC_) != 0:
        tile = pid * 0
        while tile >= 0:
            mbarrier.wait(stored.index(nt % 2), (nt // 2) & 1)
            tile = _get(dyn, dyn.type.shape[0] - 2 + nt % 2)
            mbarrier.arrive(freed.index(nt % 2), count=1)
            if tile >= 0:
                _count(CNT, TICK, tile, 1, P, MODE)
                if (MODE & TRACE_) != 0:
                    _stamp(CNT, pid, P, 1)
            nt += 1
        return nt
    if (MODE & BALANCED_) != 0:  # (RED_SUMS: no tickets) a count per task; WAVES counts the task's boxes
        SH = TICK + 4 * TMAX_ + P * SHW_
        nb = pid * 0 + 1
        if (MODE & WAVES_) != 0:
            nb = pid * 0 + _blocks(S, P)
        for blk in range(nb):
            lo, hi, step = _tasks(pid, tiles, S, stages, G, SH, blk, P, MODE)
            for t in range(lo, hi, step):
                tile, _, _, n = _task(t, pid, tiles, S, stages, G, SH, blk, 1, P, MODE)
                mbarrier.wait(stored.index(nt % 2), (nt // 2) & 1)
                mbarrier.arrive(freed.index(nt % 2), count=1)
                _count(CNT, TICK, tile, n, P, MODE)
                if (MODE & TRACE_) != 0:
                    _stamp(CNT, pid, P, 1)
                nt += 1
        return nt
    for t in range(pid, tiles * S, G):
        tile = t % tiles
        mbarrier.wait(stored.index(nt % 2), (nt // 2) & 1)
        mbarrier.arrive(freed.index(nt % 2), count=1)
        if S == 1 or (MODE & TICKETS_) == 0:
            _count(CNT, TICK, tile, 1, P, MODE)
        else:
            ticket = gl.atomic_add(TICK + P * TMAX_ + tile, 1, sem="acq_rel")
            if ticket == S - 1:  # the tile's last split: the sum of all of them, in order
                for r0 in range(0, R, 8):
                    offs = (r0 + rows[:, None]) * N + tile * BN + cols[None, :]
                    total = gl.zeros([8, BN], gl.float32, L)
                    for sp in range(S):
                        total += gl.load(PART + sp * R * N + offs, cache_modifier=".cg")
                    gl.store(OUT + offs, total.to(gl.bfloat16))
                gl.store(TICK + P * TMAX_ + tile, 0)  # for the next launch
                _count(CNT, TICK, tile, 1, P, MODE)
        if (MODE & TRACE_) != 0:
            _stamp(CNT, pid, P, 1)
        nt += 1
    return nt


@gluon.jit
def _signaller(stored, freed, dyn, O0, O1, O2, O3, N0, N1, N2, N3, PART, TICK, CNT, pid, G, NL, T0, T1, T2, T3,
               S0, S1, S2, S3, K0, K1, K2, K3, R: gl.constexpr, BN: gl.constexpr, FIRST: gl.constexpr,
               LAST: gl.constexpr, MODE: gl.constexpr):  # fmt: skip
    """SIGNAL_WARP: every layer's and phase's counts for this program (:func:`_signal`), then the launch's end."""
    P0, P1, P2, P3 = _parts(PART, R, S0, S1, S2, N0, N1, N2)
    nt = pid * 0
    for _ in range(NL):
        if FIRST <= 0 and LAST >= 0:
            nt = _signal(stored, freed, dyn, O0, P0, TICK, CNT, nt, pid, G, T0, S0, K0, N0, R, BN, 0, MODE)
        if FIRST <= 1 and LAST >= 1:
            nt = _signal(stored, freed, dyn, O1, P1, TICK, CNT, nt, pid, G, T1, S1, K1, N1, R, BN, 1, MODE)
        if FIRST <= 2 and LAST >= 2:
            nt = _signal(stored, freed, dyn, O2, P2, TICK, CNT, nt, pid, G, T2, S2, K2, N2, R, BN, 2, MODE)
        if FIRST <= 3 and LAST >= 3:
            nt = _signal(stored, freed, dyn, O3, P3, TICK, CNT, nt, pid, G, T3, S3, K3, N3, R, BN, 3, MODE)
    _launch_end(TICK, CNT, G, T0, T1, T2, T3, 1, MODE)


@gluon.jit
def _producer(w0, w1, w2, w3, x0, x1, x2, x3, x0b, ring_w, ring_x, ready, empty, dyn, CNT, TICK, pid, G, NL, T0, T1,
              T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, E0, E1, E2, E3, A0, A1, A2, A3, FIRST: gl.constexpr,
              LAST: gl.constexpr, MODE: gl.constexpr, COPIES: gl.constexpr):  # fmt: skip
    """The producer warp: every layer's phases FIRST..LAST in turn (:func:`_produce`); with TWO_PRODUCERS, one of
    two (``COPIES`` 1: the weight boxes, 2: the activation boxes)."""
    BN: gl.constexpr = w0.block_type.shape[0]
    R: gl.constexpr = x0.block_type.shape[0]
    RED: gl.constexpr = (MODE & RED_SUMS_) != 0  # (then each layer's activations are rows of their own)
    twin = S2 * K2 * BK // BN  # down's K is gate/up's first half: each box's up tile is this many tiles on
    if (MODE & BALANCED_) != 0:  # (K2: all of down's K)
        twin = K2 * BK // BN
    it = pid * 0
    q0 = pid * 0 - 1  # (DYNAMIC: each phase's claim kept for the next layer; none yet)
    q1 = q0
    q2 = q0
    q3 = q0
    for ly in range(NL):  # counters only grow within a launch: layer ly waits for ly + 1 times a layer's counts
        xr = ly * R if RED else 0
        if FIRST <= 0 and LAST >= 0:
            if ly == 0:
                it, q0 = _produce(w0, x0, ring_w, ring_x, ready, empty, dyn, CNT, TICK, it, q0, pid, G, ly, 0, T0, S0,
                                  K0, E0, 0, 0, 0, -1, MODE, COPIES)  # fmt: skip
            else:  # the layer before's Q/K/V (its first columns, as wide as O's input) stands in for attention
                it, q0 = _produce(w0, x0b, ring_w, ring_x, ready, empty, dyn, CNT, TICK, it, q0, pid, G, ly,
                                  xr - R if RED else 0, T0, S0, K0, E0, ly * A0, 0, 0, 3, MODE, COPIES)  # fmt: skip
        if FIRST <= 1 and LAST >= 1:
            it, q1 = _produce(w1, x1, ring_w, ring_x, ready, empty, dyn, CNT, TICK, it, q1, pid, G, ly, xr, T1, S1, K1,
                              E1, (ly + 1) * A1, 0, 1, 0 if FIRST <= 0 else -1, MODE, COPIES)  # fmt: skip
        if FIRST <= 2 and LAST >= 2:
            it, q2 = _produce(w2, x2, ring_w, ring_x, ready, empty, dyn, CNT, TICK, it, q2, pid, G, ly, xr, T2, S2, K2,
                              E2, (ly + 1) * A2, twin, 2, 1 if FIRST <= 1 else -1, MODE, COPIES)  # fmt: skip
        if FIRST <= 3 and LAST >= 3:
            it, q3 = _produce(w3, x3, ring_w, ring_x, ready, empty, dyn, CNT, TICK, it, q3, pid, G, ly, xr, T3, S3, K3,
                              E3, (ly + 1) * A3, 0, 3, 2 if FIRST <= 2 else -1, MODE, COPIES)  # fmt: skip


@gluon.jit
def _parts(PART, R: gl.constexpr, S0, S1, S2, N0, N1, N2):
    """Each phase's float32 partials, apart (with TILE_WAITS or every layer in one launch, phases overlap)."""
    P1 = PART + S0 * R * N0
    P2 = P1 + S1 * R * N1
    return PART, P1, P2, P2 + S2 * R * N2


@gluon.jit
def _launch_end(TICK, CNT, G, T0, T1, T2, T3, num_warps: gl.constexpr, MODE: gl.constexpr):
    """After a program's last count: the last program out (every wait of this launch is over) sets the counters
    back to 0 for the next launch."""
    done = gl.atomic_add(CNT + 7 * CNT_STRIDE_, 1, sem="acq_rel")
    if done == G - 1:
        for i in gl.static_range(8):
            gl.store(CNT + i * CNT_STRIDE_, 0)
        if (MODE & DYNAMIC_) != 0:  # and the tasks' claims
            for p in gl.static_range(4):
                gl.store(TICK + p * TMAX_, 0)
        if (MODE & TILE_WAITS_) != 0:  # and the tile counters
            r = gl.arange(0, 32 * num_warps, layout=gl.BlockedLayout([1], [32], [num_warps], [0]))
            _zero(TICK + 4 * TMAX_, T0, r)
            _zero(TICK + 5 * TMAX_, T1, r)
            _zero(TICK + 6 * TMAX_, T2, r)
            _zero(TICK + 7 * TMAX_, T3, r)


@gluon.jit
def _consumer(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, O0, O1, O2, O3, N0, N1, N2, N3, PART, TICK, CNT,
              pid, G, NL, T0, T1, T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, FIRST: gl.constexpr, LAST: gl.constexpr,
              MODE: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    R: gl.constexpr = ring_x.type.shape[1]
    P0, P1, P2, P3 = _parts(PART, R, S0, S1, S2, N0, N1, N2)
    it = pid * 0
    nt = pid * 0
    if (MODE & TRACE_) != 0:  # (the program's SM, for WEIGHTED's paces)
        gl.store(CNT + SMID_AT_ + pid, gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,l", [CNT], dtype=gl.int32,
                                                                 is_pure=True, pack=1))  # fmt: skip
    for ly in range(NL):
        if FIRST <= 0 and LAST >= 0:
            it, nt = _consume(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, O0, P0, TICK, CNT, it, nt, pid, G,
                              ly, T0, S0, K0, N0, 0, MODE, num_warps)  # fmt: skip
        if FIRST <= 1 and LAST >= 1:
            it, nt = _consume(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, O1, P1, TICK, CNT, it, nt, pid, G,
                              ly, T1, S1, K1, N1, 1, MODE, num_warps)  # fmt: skip
        if FIRST <= 2 and LAST >= 2:
            it, nt = _consume(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, O2, P2, TICK, CNT, it, nt, pid, G,
                              ly, T2, S2, K2, N2, 2, MODE, num_warps)  # fmt: skip
        if FIRST <= 3 and LAST >= 3:
            it, nt = _consume(ring_w, ring_x, xs, ready, empty, stored, freed, dyn, O3, P3, TICK, CNT, it, nt, pid, G,
                              ly, T3, S3, K3, N3, 3, MODE, num_warps)  # fmt: skip
    if (MODE & SIGNAL_WARP_) == 0:
        _launch_end(TICK, CNT, G, T0, T1, T2, T3, num_warps, MODE)


@gluon.jit
def _zero(X, n, r):
    """``X[:n] = 0``, ``r.shape[0]`` at a time."""
    for i in range(0, n, r.shape[0]):
        gl.store(X + i + r, 0, mask=i + r < n)


@gluon.jit
def _chain_kernel(w0, w1, w2, w3, x0, x1, x2, x3, x0b, O0, O1, O2, O3, N0, N1, N2, N3, T0, T1, T2, T3,
                  S0, S1, S2, S3, K0, K1, K2, K3, E0, E1, E2, E3, A0, A1, A2, A3, PART, TICK, CNT, G, NL,
                  FIRST: gl.constexpr, LAST: gl.constexpr, DEPTH: gl.constexpr, MODE: gl.constexpr,
                  num_warps: gl.constexpr):  # fmt: skip
    """Phases FIRST..LAST of the chain, for ``NL`` layers: phase p multiplies activation ``x_p`` (a TMA descriptor
    of ``[ROWS, K]``) by weight ``w_p`` (every layer's, stacked) into bf16 ``O_p [ROWS, N_p]``, in ``T_p`` tiles of
    ``S_p`` splits of ``K_p`` stages each; ``E_p`` weight boxes of each task go out before its wait for ``A_p``
    counts of phase ``p - 1`` (``A0``: of the layer before's Q/K/V, which ``x0b`` reads). ``MODE``: the parts of
    :data:`FULL` that run."""
    pid = gl.program_id(0)
    BN: gl.constexpr = w0.block_type.shape[0]
    R: gl.constexpr = x0.block_type.shape[0]
    ring_w = gl.allocate_shared_memory(w0.dtype, [DEPTH, BN, BK], w0.layout)
    ring_x = gl.allocate_shared_memory(x0.dtype, [DEPTH, R, BK], x0.layout)  # (float32 with RED_SUMS)
    XS: gl.constexpr = (3 if (MODE & INFLIGHT2_) != 0 else 2) if (MODE & (RED_SUMS_ | BF16_SUMS_)) == RED_SUMS_ else 1
    xs = gl.allocate_shared_memory(gl.bfloat16, [XS, R, BK], gl.NVMMASharedLayout.get_default_for([R, BK], gl.bfloat16))
    ready = gl.allocate_shared_memory(gl.int64, [DEPTH, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [DEPTH, 1], mbarrier.MBarrierLayout())
    stored = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # (SIGNAL_WARP's hand-over)
    freed = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    DYN: gl.constexpr = (MODE & DYNAMIC_) != 0  # (a task number per slot, then the hand-over's two)
    dyn = gl.allocate_shared_memory(gl.int32, [DEPTH + 2 if DYN else 1, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    TWO: gl.constexpr = (MODE & TWO_PRODUCERS_) != 0 and (MODE & X_LOADS_) != 0
    for i in gl.static_range(DEPTH):
        mbarrier.init(ready.index(i), count=2 if TWO else 1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(stored.index(i), count=1)
        mbarrier.init(freed.index(i), count=1)
    if TWO:  # (with a signal warp: the host checks)
        gl.warp_specialize([
            (_consumer, (ring_w, ring_x, xs, ready, empty, stored, freed, dyn, O0, O1, O2, O3, N0, N1, N2, N3, PART,
                         TICK, CNT, pid, G, NL, T0, T1, T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, FIRST, LAST, MODE,
                         num_warps)),
            (_producer, (w0, w1, w2, w3, x0, x1, x2, x3, x0b, ring_w, ring_x, ready, empty, dyn, CNT, TICK, pid, G, NL,
                         T0, T1, T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, E0, E1, E2, E3, A0, A1, A2, A3, FIRST, LAST,
                         MODE, 1)),
            (_signaller, (stored, freed, dyn, O0, O1, O2, O3, N0, N1, N2, N3, PART, TICK, CNT, pid, G, NL, T0, T1, T2,
                          T3, S0, S1, S2, S3, K0, K1, K2, K3, R, BN, FIRST, LAST, MODE)),
            (_producer, (w0, w1, w2, w3, x0, x1, x2, x3, x0b, ring_w, ring_x, ready, empty, dyn, CNT, TICK, pid, G, NL,
                         T0, T1, T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, E0, E1, E2, E3, A0, A1, A2, A3, FIRST, LAST,
                         MODE, 2)),
        ], [1, 1, 1], [24, 80, 24])  # fmt: skip
    elif (MODE & SIGNAL_WARP_) != 0:
        gl.warp_specialize([
            (_consumer, (ring_w, ring_x, xs, ready, empty, stored, freed, dyn, O0, O1, O2, O3, N0, N1, N2, N3, PART,
                         TICK, CNT, pid, G, NL, T0, T1, T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, FIRST, LAST, MODE,
                         num_warps)),
            (_producer, (w0, w1, w2, w3, x0, x1, x2, x3, x0b, ring_w, ring_x, ready, empty, dyn, CNT, TICK, pid, G, NL,
                         T0, T1, T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, E0, E1, E2, E3, A0, A1, A2, A3, FIRST, LAST,
                         MODE, 0)),
            (_signaller, (stored, freed, dyn, O0, O1, O2, O3, N0, N1, N2, N3, PART, TICK, CNT, pid, G, NL, T0, T1, T2,
                          T3, S0, S1, S2, S3, K0, K1, K2, K3, R, BN, FIRST, LAST, MODE)),
        ], [1, 1], [24, 80])  # fmt: skip
    else:
        gl.warp_specialize([
            (_consumer, (ring_w, ring_x, xs, ready, empty, stored, freed, dyn, O0, O1, O2, O3, N0, N1, N2, N3, PART,
                         TICK, CNT, pid, G, NL, T0, T1, T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, FIRST, LAST, MODE,
                         num_warps)),
            (_producer, (w0, w1, w2, w3, x0, x1, x2, x3, x0b, ring_w, ring_x, ready, empty, dyn, CNT, TICK, pid, G, NL,
                         T0, T1, T2, T3, S0, S1, S2, S3, K0, K1, K2, K3, E0, E1, E2, E3, A0, A1, A2, A3, FIRST, LAST,
                         MODE, 0)),
        ], [1], [24])  # fmt: skip


# -- the host side -------------------------------------------------------------------------------------------------


def shared_bytes(depth: int, mode: int) -> int:
    """A program's shared memory: ``depth`` slots of a weight box and an activation box (float32 with RED_SUMS,
    which also takes two bf16 boxes to multiply from, three with INFLIGHT2, and a tile's float32 to store), and its
    barriers. With BF16_SUMS the boxes are bf16 and multiplied as they are."""
    red = mode & RED_SUMS
    f32 = red and not mode & BF16_SUMS
    x = ROWS * TILE[1] * (4 if f32 else 2)
    copies = (3 if mode & INFLIGHT2 else 2) if f32 else 0
    extra = copies * ROWS * TILE[1] * 2 + TILE[0] * ROWS * 4 if red else 0  # (and the outputs' change of layout)
    return depth * (TILE[0] * TILE[1] * 2 + x) + extra + 1024


def chain_shapes(s: dict) -> list[tuple[int, int]]:
    """(N, K) of the four phases: O, gate/up, down (reading gate/up's first ``inter`` columns), Q/K/V."""
    return [(s["hidden"], s["dq"]), (2 * s["inter"], s["hidden"]), (s["hidden"], s["inter"]), (s["nqkv"], s["hidden"])]


def splits_for(n: int, k: int, programs: int) -> int:
    """The most splits (doubling) that keep the tasks within one round of the programs and 2+ boxes per split."""
    sp = 1
    while n // TILE[0] * sp * 2 <= programs and k % (2 * sp * TILE[1]) == 0 and k // (2 * sp) >= 2 * TILE[1]:
        sp *= 2
    return sp


def blocks(p: int, waves: int) -> tuple[int, int]:
    """WAVES: phase p's waves of tiles and chunks of K (:func:`_blocks`)."""
    return (1 if p == 3 else waves), (1 if p == 0 else waves)


def equal_shares(shapes: list[tuple[int, int]], programs: int, least: int) -> list[int]:
    """BALANCED: how many programs share each phase's boxes: all of them, unless that leaves a share under ``least``
    boxes."""
    return [max(1, min(programs, n // TILE[0] * (k // TILE[1]) // least)) for n, k in shapes]


class Chain:
    """Launches of :func:`_chain_kernel` for one layer shape: ``launches`` 1 (a layer's four phases), 4 (one each),
    or 0 (``layers`` layers' phases in one launch: call it with :meth:`weights`'s ``stack``). Called with the first
    activation's descriptors in bf16 and in float32 (RED_SUMS reads float32); returns the last layer's outputs."""

    def __init__(self, s: dict, depth: int, ahead: bool, launches: int, per_sm: int, splits=None, mode: int = FULL,
                 layers: int = 1, warps: int = 4, least: int = 1, waves: int = 2):  # fmt: skip
        self.shapes = chain_shapes(s)
        self.inter = s["inter"]
        self.G = torch.cuda.get_device_properties(0).multi_processor_count * per_sm  # all resident: they wait
        self.red = bool(mode & RED_SUMS)
        self.f32 = self.red and not mode & BF16_SUMS  # (the activations' dtype: float32 boxes, or bf16)
        if warps != 4 and (warps != 8 or TILE[0] != 128):
            raise ValueError("a consumer of 8 warps (two warpgroups, 64 weight rows each) takes 128-row tiles")
        self.warps = warps
        if shared_bytes(depth, mode) * per_sm > SHARED:
            raise ValueError(f"depth {depth} does not fit {per_sm} programs per SM")
        self.balanced = bool(mode & BALANCED)
        if mode & WEIGHTED and not self.balanced:
            raise ValueError("WEIGHTED is a way of BALANCED")
        if mode & WAVES and (not self.balanced or mode & WEIGHTED or not mode & TILE_WAITS or not mode & SIGNAL_WARP):
            raise ValueError("WAVES is a way of BALANCED (not WEIGHTED), with tile waits and a signal warp")
        if mode & POLL_EARLY and not mode & WAVES:
            raise ValueError("POLL_EARLY is a way of WAVES")
        if self.balanced:  # (the splits: how many programs share each phase, ``least`` boxes or more each)
            if splits or not mode & RED_SUMS or mode & (DYNAMIC | INFLIGHT2) or mode & TILE_WAITS and not mode & WAVES:
                raise ValueError("equal shares take RED_SUMS, no --splits, no claims or INFLIGHT2, tile waits only in "
                                 "waves")  # fmt: skip
            splits = [waves] * 4 if mode & WAVES else equal_shares(self.shapes, self.G, least)
        self.splits = list(splits) if splits else [splits_for(n, k, self.G) for n, k in self.shapes]
        for (n, k), sp in zip(self.shapes, self.splits):
            if n % TILE[0] or k % ((1 if self.balanced else sp) * TILE[1]) or n // TILE[0] > TMAX:
                raise ValueError(f"tiles of {TILE} and {sp} splits do not divide the GEMM {n} x {k}")
        self.tiles = [n // TILE[0] for n, _ in self.shapes]
        self.stages = [k // (1 if self.balanced else sp) // TILE[1] for (_, k), sp in zip(self.shapes, self.splits)]
        self.waves = bool(mode & WAVES)
        for p, (t, st) in enumerate(zip(self.tiles, self.stages)):
            if self.waves and (t % blocks(p, waves)[0] or st % blocks(p, waves)[1] or p == 1 and t // waves % 2):
                raise ValueError(f"{waves} waves do not divide phase {p}'s {t} tiles of {st} boxes")
        # (ahead: True for as many boxes as the ring holds, or how many)
        self.pre = [min(st, depth if ahead is True else int(ahead)) if ahead else 0 for st in self.stages]
        self.depth, self.launches, self.mode = depth, launches, mode
        # what phase p waits for: phase p - 1's tiles (each counted by its last split), or with no tickets its tasks;
        # with TILE_WAITS, what one tile's counter must reach
        if mode & BF16_SUMS and not self.red:
            raise ValueError("BF16_SUMS is a way of RED_SUMS")
        if mode & DYNAMIC and (not mode & SIGNAL_WARP or not self.red or mode & (TILE_WAITS | TRACE)):
            raise ValueError("DYNAMIC takes RED_SUMS and a signal warp, and no tile waits or trace")
        if self.red and mode & TICKETS:
            raise ValueError("RED_SUMS makes the sums without tickets")
        if mode & TWO_PRODUCERS and (not mode & SIGNAL_WARP or mode & (DYNAMIC | POLL_EARLY)):
            raise ValueError("two producers take a signal warp, and no claims or early polls")
        per_tile = [1 if mode & TICKETS or sp == 1 else sp for sp in self.splits]
        done = [t * c for t, c in zip(self.tiles, per_tile)]
        if self.balanced:  # (a count per task: a share's tiles)
            done = [sum(len(self.spans(p, pid)) for pid in range(self.G)) for p in range(4)]
        self.targets = (per_tile if mode & TILE_WAITS else done)[:3]
        if self.waves:  # (a tile is done when all its boxes are counted)
            self.targets = self.stages[:3]
        if mode & INFLIGHT2 and min(self.stages) < 2:
            raise ValueError("two products in flight take two or more stages a task")
        most = max(n for p in range(4) for pid in range(self.G) for _, _, n in self.spans(p, pid))
        if mode & TILE_WAITS and most > SPAN:
            raise ValueError(f"tile waits take at most {SPAN} stages a task")
        self.a0 = done[3]  # a later layer's output projection waits for the whole Q/K/V before it
        dev = dict(device="cuda")
        self.cnt = torch.zeros(SMID_AT + 1024, dtype=torch.int32, **dev)
        self.tick = torch.zeros(8 * TMAX, dtype=torch.int32, **dev)  # the tickets, then the tile counters
        parts = [1 if self.balanced else sp for sp in self.splits]  # (RED_SUMS reads no partials)
        self.part = torch.empty(sum(sp * ROWS * n for (n, _), sp in zip(self.shapes, parts)), **dev)
        if self.red:  # float32 (or bf16) outputs, a layer's rows each; phases with split tiles first, zeroed per launch
            nl = layers if launches == 0 else 1
            sizes = [nl * ROWS * n for n, _ in self.shapes]
            summed = [any(n < k for pid in range(self.G) for _, _, n in self.spans(p, pid)) for p, k in
                      enumerate(self.stages)] if self.balanced else [sp > 1 for sp in self.splits]  # fmt: skip
            if mode & WEIGHTED:  # (shares by pace seldom end on a tile's edge)
                summed = [True] * 4
            order = sorted(range(4), key=lambda p: not summed[p])
            buf = torch.empty(sum(sizes), dtype=torch.float32 if self.f32 else torch.bfloat16, **dev)
            self.zeroed = buf[: sum(sizes[p] for p in order if summed[p])]
            self.outs, at = [None] * 4, 0
            for p in order:
                self.outs[p] = buf[at : at + sizes[p]].view(nl * ROWS, self.shapes[p][0])
                at += sizes[p]
            # (the consumer reads a float32 box into registers: no swizzle needed; a bf16 box goes to the product)
            xl = gl.NVMMASharedLayout(0, 32, 2) if self.f32 else _layout([ROWS, TILE[1]])
        else:
            self.outs = [torch.zeros(ROWS, n, dtype=torch.bfloat16, **dev) for n, _ in self.shapes]
            xl = _layout([ROWS, TILE[1]])
        ins = [None, self.outs[0], self.outs[1][:, : self.inter], self.outs[2], self.outs[3][:, : self.shapes[0][1]]]
        self.xdescs = [None] + [TensorDescriptor.from_tensor(x, [ROWS, TILE[1]], xl) for x in ins[1:]]

    def spans(self, p: int, pid: int) -> list[tuple[int, int, int]]:
        """Program ``pid``'s tasks of phase ``p`` as the kernel makes them (:func:`_tasks`, :func:`_task`): each
        task's tile, first box of K and stages."""
        tiles, sp, st = self.tiles[p], self.splits[p], self.stages[p]
        if not self.balanced:
            return [(t % tiles, t // tiles * st, st) for t in range(pid, tiles * sp, self.G)]
        if self.waves:  # (a share of every block, wave-major; gate/up's tiles in pairs)
            (na, nc), out = blocks(p, sp), []
            tb, kc = tiles // na, st // nc
            e0, e1 = pid * tb * kc // self.G, (pid + 1) * tb * kc // self.G
            for blk in range(na * nc):
                a, c = divmod(blk, nc)
                for i in range(e0 // kc, -(-e1 // kc) if e1 > e0 else 0):
                    pos = a * tb + i
                    tile = pos // 2 + pos % 2 * (tiles // 2) if p == 1 else pos
                    k0 = max(e0 - i * kc, 0)
                    out.append((tile, c * kc + k0, min(e1 - i * kc, kc) - k0))
            return out
        total = tiles * st
        b0, b1 = min(pid, sp) * total // sp, min(pid + 1, sp) * total // sp
        return [(t, max(b0 - t * st, 0), min(b1 - t * st, st) - max(b0 - t * st, 0))
                for t in range(b0 // st, -(-b1 // st) if b1 > b0 else 0)]  # fmt: skip

    def weigh(self, pace: dict[int, float]) -> list[dict[int, tuple[int, int]]]:
        """WEIGHTED: each SM's share of each phase's boxes in proportion to its ``pace`` (boxes per µs, by SM id),
        into the kernel's tables; the waits' targets follow (a count per task). Returns the shares."""
        sms = sorted(pace)
        if len(sms) != self.G or max(sms) >= SHW // 2:
            raise ValueError(f"{len(sms)} SMs paced for {self.G} programs")
        cum = [0.0]
        for sm in sms:
            cum.append(cum[-1] + pace[sm])
        table = torch.zeros(4, SHW, dtype=torch.int32)
        shares, done = [], []
        for p, (tiles, st) in enumerate(zip(self.tiles, self.stages)):
            cuts = [round(tiles * st * c / cum[-1]) for c in cum]
            shares.append({sm: (cuts[i], cuts[i + 1]) for i, sm in enumerate(sms)})
            for sm, (b0, b1) in shares[-1].items():
                table[p, 2 * sm], table[p, 2 * sm + 1] = b0, b1
            done.append(sum((b1 - 1) // st - b0 // st + 1 for b0, b1 in shares[-1].values() if b1 > b0))
        self.tick[4 * TMAX : 4 * TMAX + 4 * SHW].copy_(table.view(-1))
        self.targets, self.a0 = done[:3], done[3]
        return shares

    def busy(self) -> list[int]:
        """How many programs (the first ones) have a task in each phase."""
        if self.waves:
            return [self.G] * 4
        return [sp if self.balanced else min(self.G, t * sp) for t, sp in zip(self.tiles, self.splits)]

    @staticmethod
    def weights(s: dict, layers: int) -> tuple[list[dict], dict]:
        """Random weights for ``layers`` layers: per layer (``w``, ``descs``), and ``stack``: each phase's weights
        of every layer in one tensor (the layers' are views of it) and its descriptor."""
        torch.manual_seed(0)
        stacked = [torch.randn(layers * n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n, k in chain_shapes(s)]
        desc = lambda w: TensorDescriptor.from_tensor(w, list(TILE), _layout(list(TILE)))  # noqa: E731
        out = []
        for i in range(layers):
            ws = [w[i * n : (i + 1) * n] for w, (n, _) in zip(stacked, chain_shapes(s))]
            out.append(dict(w=ws, descs=[desc(w) for w in ws]))
        return out, dict(w=stacked, descs=[desc(w) for w in stacked], layers=layers)

    def __call__(self, x0descs, lw: dict) -> list[torch.Tensor]:
        xs = [x0descs[self.f32]] + self.xdescs[1:]
        if self.red:
            self.zeroed.zero_()
        ranges = [(0, 3)] if self.launches in (0, 1) else [(p, p) for p in range(4)]
        for first, last in ranges:
            _chain_kernel[(self.G,)](
                *lw["descs"], *xs, *self.outs, *(n for n, _ in self.shapes), *self.tiles, *self.splits,
                *self.stages, *self.pre, self.a0, *self.targets, self.part, self.tick, self.cnt, self.G,
                lw.get("layers", 1), first, last, self.depth, self.mode, num_warps=self.warps, maxnreg=128,
            )  # fmt: skip
        return [o[-ROWS:] for o in self.outs]


def trace(chain: Chain, x0desc, lw: dict) -> list[dict]:
    """One launch of ``chain`` (its mode with TRACE) and, per phase, µs from the launch's first ready stage: when
    the programs' first stages were ready, when their waits for the phase before were over, and when they counted
    their last task (min / median / max over the programs that had a task in the phase)."""
    traced = Chain.__new__(Chain)
    traced.__dict__.update(chain.__dict__, mode=chain.mode | TRACE)
    traced(x0desc, lw)
    torch.cuda.synchronize()
    st = chain.cnt[TRACE_AT : TRACE_AT + chain.G * 4 * 3 * 2].view(torch.int64).view(chain.G, 4, 3)
    return trace_rows(st.cpu(), chain.busy())


def paces(chain: Chain, x0desc, lw: dict, runs: int = 3) -> tuple[dict[int, float], list[str]]:
    """WEIGHTED's calibration: ``runs`` traced launches of ``chain`` (BALANCED: equal shares) and each SM's pace
    over gate/up and down (its boxes per µs from its first ready stage to its last count), averaged; and lines that
    say how the paces spread and whether they repeat from run to run (an SM's own speed, or noise)."""
    seen = []
    for _ in range(runs):
        trace(chain, x0desc, lw)
        st = chain.cnt[TRACE_AT : TRACE_AT + chain.G * 4 * 3 * 2].view(torch.int64).view(chain.G, 4, 3).cpu()
        sm = chain.cnt[SMID_AT : SMID_AT + chain.G].cpu().tolist()
        pace = {}
        for pid in range(chain.G):
            boxes = sum(n for p in (1, 2) for _, _, n in chain.spans(p, pid))
            us = sum((st[pid, p, 1] - st[pid, p, 0]).item() for p in (1, 2)) / 1e3
            pace[sm[pid]] = boxes / us
        if len(pace) != chain.G:
            raise ValueError(f"{chain.G} programs on {len(pace)} SMs")
        seen.append(pace)
    sms = sorted(seen[0])
    mean = {sm: sum(p[sm] for p in seen) / runs for sm in sms}
    v = sorted(mean.values())
    a, b = torch.tensor([seen[0][sm] for sm in sms]), torch.tensor([seen[-1][sm] for sm in sms])
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    lines = [f"paces (boxes per µs, {runs} traced runs): min {v[0]:.2f}, median {v[len(v) // 2]:.2f}, max {v[-1]:.2f}; "
             f"first run against last, correlation {r:.2f}"]  # fmt: skip
    return mean, lines


def stage_gaps(chain: Chain, least_us: float = 0.5, burst: int = 10) -> list[str]:
    """After :func:`trace`: for each of the four traced programs, the median time between two of its stages being
    ready, per phase, and every wait of ``least_us`` or more (which phase, task and stage it came before); for the
    first program, the ``burst`` gaps after each phase's first stage."""
    st = chain.cnt[STAGES_AT:SMID_AT].view(torch.int64).view(TRACED, MAXIT).cpu()
    t0 = st[:, 0].min()
    lines = []
    for sel, pid in enumerate((0, 1, chain.G // 2, chain.G - 1)):
        where = [(p, n, i) for p in range(4) for n, (_, _, k) in enumerate(chain.spans(p, pid)) for i in range(k)]
        if not where:  # (a program with no task: more programs than a phase's tasks)
            lines.append(f"program {pid}: no task")
            continue
        at = ((st[sel, : len(where)] - t0).double() / 1e3).tolist()
        per_phase = []
        for p in range(4):
            gaps = sorted(b - a for (x, a), (y, b) in zip(zip(where, at), zip(where[1:], at[1:])) if x[0] == y[0] == p)
            per_phase.append(f"{gaps[len(gaps) // 2]:.2f}" if gaps else "-")
        long = [f"{b - a:.1f} before phase {w[0]} task {w[1]} stage {w[2]} (at {b:.1f})"
                for (a, b, w) in zip(at, at[1:], where[1:]) if b - a >= least_us]  # fmt: skip
        lines.append(f"program {pid}: first stage ready at {at[0]:.1f}, last at {at[-1]:.1f}; median µs between "
                     f"stages per phase {' / '.join(per_phase)}; waits: {'; '.join(long) or 'none'}")  # fmt: skip
        if sel == 0:  # after each boundary, the consumer's pace while the stages the ring holds are ready
            firsts = [n for n, w in enumerate(where) if w[1:] == (0, 0) and n > 0]
            step = [b - a for a, b in zip(at, at[1:])]
            gaps = [" ".join(f"{g:.2f}" for g in step[n : n + burst]) for n in firsts]
            lines.append(f"program {pid}: µs between its first {burst + 1} stages of each phase after the first: "
                         + "; ".join(gaps))  # fmt: skip
    return lines


def trace_rows(st: torch.Tensor, busy: list[int]) -> list[dict]:
    """:func:`trace`'s figures from the stamps ``[programs, 4 phases, 3]`` (ns) of the ``busy[p]`` first programs
    (those with a task in phase p)."""
    t0 = st[: busy[0], 0, 0].min()
    out = []
    for p, b in enumerate(busy):
        ours = st[:b, p]
        row = {"phase": p}
        for k, name in ((0, "first ready"), (2, "wait over"), (1, "last counted")):
            if k == 2 and p == 0:
                continue
            v = ((ours[:, k] - t0).double() / 1e3).sort().values
            row[name] = (v[0].item(), v[len(v) // 2].item(), v[-1].item())
        out.append(row)
    return out


# the ways of a MODE, in words, outermost first (each named after those below it)
_WAYS = ((POLL_EARLY, ", polls early"), (WAVES, ", in waves"), (WEIGHTED, ""), (BALANCED, ", equal shares"),
         (DYNAMIC, ", tasks claimed"), (SAME_BOX, ", every weight box one box in L2"), (RAW_X, ", no change to bf16"),
         (BF16_SUMS, " in bf16"), (INFLIGHT2, ", two products in flight"), (RED_SUMS, ", sums by red.add"),
         (SIGNAL_WARP, ", a signal warp"), (AHEAD_ONCE, ", ahead once a phase"), (TILE_WAITS, ", tile waits"),
         (ROTATE, ", K rotated"), (BACKOFF, ", polls spaced"), (TWO_PRODUCERS, ", two producers"))  # fmt: skip


def describe(mode: int) -> str:
    """What a MODE leaves out, in words."""
    for flag, words in _WAYS:
        if mode & flag:
            inner = describe(mode & ~flag)
            if flag == RED_SUMS:  # (the sums are made, without tickets)
                inner = inner.replace("tickets: sums not made", "tickets")
            if flag == WEIGHTED:
                inner = inner.replace("equal shares", "shares by each SM's pace")
            return inner + words
    if mode == FULL:
        return "the chain"
    if mode == FULL & ~FENCES & ~TICKETS & ~X_LOADS:
        return "the chain without fences, tickets, activations' copies"
    if mode & ~(X_LOADS | PRODUCTS) == 0:  # (products nothing stores: ptxas drops most; see the docstring)
        parts = ["weights"] + (["activations"] if mode & X_LOADS else []) + (["products"] if mode & PRODUCTS else [])
        return " + ".join(parts) + " only (no waits, no stores)"
    gone = [
        n
        for n, f in (("products", PRODUCTS), ("waits", WAITS), ("fences", FENCES), ("tickets: sums not made", TICKETS))
        if not mode & f
    ]
    return "the chain without " + ", ".join(gone)


def reference(x0: torch.Tensor, layers: list[list[torch.Tensor]], inter: int) -> list[torch.Tensor]:
    """The chain over ``layers`` (each its four weights) in torch as the kernel rounds it: float32 products of bf16
    operands, each output rounded to bf16; a layer after the first reads the first columns of the Q/K/V before.
    Returns the last layer's four outputs."""
    x = x0
    for ws in layers:
        outs = []
        for p, w in enumerate(ws):
            y = (x.float() @ w.float().T).bfloat16()
            outs.append(y)
            x = y[:, :inter] if p == 1 else y
        x = outs[3][:, : x0.shape[1]]
    return outs


def check(chain: Chain, x0desc, lw: dict, want: list[torch.Tensor], runs: int) -> float:
    """Run ``chain`` ``runs`` times (at least once; the second run checks that its tickets and counters were reset)
    and return its outputs' largest error against ``want``, as a share of their largest value (at least 1)."""
    off = 0.0
    for _ in range(max(runs, 1)):
        got = chain(x0desc, lw)
        torch.cuda.synchronize()
        for g, w in zip(got, want):
            off = max(off, (g.float() - w.float()).abs().max().item() / max(1.0, w.float().abs().max().item()))
    return off


def cublas(x0: torch.Tensor, lw: dict, bufs: list[torch.Tensor], inter: int) -> None:
    x = x0
    for p, (w, y) in enumerate(zip(lw["w"], bufs)):
        torch.mm(x, w.T, out=y)
        x = y[:, :inter] if p == 1 else y


def measure(model: str, depths: list[int], per_sm: int, bandwidth: float, splits=None, traces=(),
            variants=None, warps: int = 4, least: int = 1, waves: int = 2) -> list[dict]:  # fmt: skip
    s = shapes(model)
    layers, stack = Chain.weights(s, s["layers"])
    floor = sum(n * k * 2 for n, k in chain_shapes(s)) / bandwidth * 1e6
    x0 = torch.randn(ROWS, s["dq"], device="cuda", dtype=torch.bfloat16)
    x0desc = (TensorDescriptor.from_tensor(x0, [ROWS, TILE[1]], _layout([ROWS, TILE[1]])),
              TensorDescriptor.from_tensor(x0.float(), [ROWS, TILE[1]], gl.NVMMASharedLayout(0, 32, 2)))  # fmt: skip
    bufs = [torch.empty(ROWS, n, device="cuda", dtype=torch.bfloat16) for n, _ in chain_shapes(s)]
    base = dict(model=model, rows=ROWS, floor_us=floor, per_sm=per_sm, bn=TILE[0], warps=warps)
    rows = [dict(base, variant="cuBLAS, a call per GEMM",
                 us=time_layers(lambda lw: cublas(x0, lw, bufs, s["inter"]), layers))]  # fmt: skip
    want = {1: reference(x0, [layers[0]["w"]], s["inter"])}  # (what one layer's launches give)
    want[0] = reference(x0, [lw["w"] for lw in layers], s["inter"])  # (every layer in one launch)
    no_fence = FULL & ~FENCES
    two = TWO_PRODUCERS | SIGNAL_WARP
    variants = variants or [(FULL, 1, True), (FULL, 4, False), (FULL | two, 1, True), (no_fence, 1, True),
                (no_fence | two, 1, True), (no_fence & ~TICKETS | two, 1, True), (X_LOADS | PRODUCTS, 1, False),
                (X_LOADS | PRODUCTS | two, 1, False), (0, 1, False)]  # fmt: skip
    for depth in depths:
        for mode, launches, ahead in variants:
            try:
                chain = Chain(s, depth, ahead, launches, per_sm, None if mode & BALANCED else splits, mode,
                              len(layers), warps, least, waves)  # fmt: skip
            except ValueError as exc:  # (a variant that does not fit leaves the others)
                print(f"!! {model} depth {depth} mode {mode}: {exc}", flush=True)
                continue
            if mode & WEIGHTED:  # (calibrated on equal shares, same depth; then checked and timed as any other)
                even = Chain(s, depth, ahead, launches, per_sm, None, mode & ~WEIGHTED, len(layers), warps, least)
                pace, lines = paces(even, x0desc, layers[0])
                chain.weigh(pace)
                for line in lines:
                    print(f"{model} depth {depth}: {line}", flush=True)
            # the sums are made (and checked) with tickets or RED_SUMS; without waits the products read what is there
            checked = mode & (TICKETS | RED_SUMS) and mode & WAITS and mode & X_LOADS and not mode & (SAME_BOX | RAW_X)
            whole = launches == 0
            off = check(chain, x0desc, stack if whole else layers[0], want[0 if whole else 1], 2 if checked else 0)
            # (a race gives errors as large as the values; roundings that differ, across 16-32 layers, less: bf16
            # sums round each split's add, up to 3 more roundings an output)
            if checked and off > (0.05 if whole else 0.02) * (2 if mode & BF16_SUMS else 1):
                print(f"!! {model} depth {depth} mode {mode} launches {launches}: off by {off:.3f} of the largest "
                      "value: not timed", flush=True)  # fmt: skip
                continue
            name = {0: "one launch for every layer", 1: "one launch", 4: "a launch per phase"}[launches]
            name += (", ahead" + ("" if ahead is True else f" {ahead} boxes") if ahead else "") + f": {describe(mode)}"
            if whole:
                us = time_layers(lambda _, c=chain: c(x0desc, stack), [stack]) / len(layers)
            else:
                us = time_layers(lambda lw, c=chain: c(x0desc, lw), layers)
            if mode in traces and launches == 1:
                print(f"trace: {model}, {per_sm} per SM, depth {depth}, {describe(mode)} ({us:.1f} µs per layer); "
                      "µs from the first ready stage, min / median / max over programs")  # fmt: skip
                for r in trace(chain, x0desc, layers[0]):  # (the graph went through every layer since: cold)
                    parts = [f"{k} {v[0]:.1f} / {v[1]:.1f} / {v[2]:.1f}" for k, v in r.items() if k != "phase"]
                    print(f"  phase {r['phase']}: " + "; ".join(parts))
                for line in stage_gaps(chain) if not mode & WEIGHTED else []:  # (its shares are by SM, not pid)
                    print(f"  {line}")
            rows.append(dict(base, variant=name, depth=depth, splits=chain.splits, launches=launches, ahead=ahead,
                             mode=mode, us=us, off=off if checked else None,
                             least=least if mode & BALANCED else None,
                             waves=waves if mode & WAVES else None))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    global TILE
    from .run import copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--depth", default="6,8", help="ring slots (an 8 KB weight box and a 4 KB activation box each)")
    ap.add_argument("--per-sm", default="2", help="programs per SM, comma-separated (all resident)")
    ap.add_argument("--splits", help="splits of K of the four phases (default: one round of the programs)")
    ap.add_argument("--bn", type=int, default=TILE[0], help="weight rows per tile (64 or 128)")
    ap.add_argument("--warps", type=int, default=4, help="the consumer's warps: 4, or 8 (two warpgroups) with --bn 128")
    ap.add_argument(
        "--modes",
        help="variants as MODE:launches (ints; launches 0: every layer in one launch), comma-separated "
        "(default: the parts)",
    )
    ap.add_argument("--least", type=int, default=1, help="BALANCED: the fewest weight boxes a program's share has")
    ap.add_argument("--waves", type=int, default=2, help="WAVES: waves of tiles (and chunks of K) a phase")
    ap.add_argument("--ahead", type=int, help="weight boxes a task copies ahead of its wait (default: the depth)")
    ap.add_argument("--trace", default="", help="modes (ints, comma-separated) to trace once after timing")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    TILE = (args.bn, TILE[1])
    bandwidth = copy_bandwidth()
    splits = [int(v) for v in args.splits.split(",")] if args.splits else None
    traces = {int(v) for v in args.trace.split(",") if v}
    variants = None
    if args.modes:
        ahead = True if args.ahead is None else args.ahead
        variants = [(int(m), int(n), ahead) for m, n in (v.split(":") for v in args.modes.split(","))]
    rows = []
    for model in args.model.split(","):
        for per_sm in (int(v) for v in args.per_sm.split(",")):
            depths = [d for d in (int(v) for v in args.depth.split(",")) if shared_bytes(d, 0) * per_sm <= SHARED]
            try:
                rows += measure(model, depths, per_sm, bandwidth, splits, traces, variants, args.warps, args.least,
                                args.waves)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 (one model's failure leaves the others' rows)
                print(f"!! {model} per_sm {per_sm}: {type(exc).__name__}: {exc}", flush=True)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; µs per layer: O, gate/up, down, Q/K/V of a decode layer, "
          f"{ROWS} rows")  # fmt: skip
    report(rows, {"model": lambda r: r["model"], "programs per SM": lambda r: f"{r['per_sm']}",
                  "weight rows per tile": lambda r: f"{r['bn']}", "consumer warps": lambda r: f"{r['warps']}",
                  "depth": lambda r: f"{r.get('depth', '')}",
                  "splits": lambda r: f"{r.get('splits', '')}", "variant": lambda r: r["variant"],
                  "µs": lambda r: f"{r['us']:.1f}", "/ floor": lambda r: f"{r['us'] / r['floor_us']:.2f}×",
                  "off (checked)": lambda r: "" if r.get("off") is None else f"{100 * r['off']:.1f} %"},
           bandwidth, args.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
