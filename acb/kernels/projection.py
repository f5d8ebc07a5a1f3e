"""A decode step's output and down projections on Hopper: a warp-specialised Gluon kernel whose split-K partial
sums the next norm adds up (:func:`acb.kernels.fused.add_rmsnorm` takes them).

cuBLAS runs these two projections of a decode step (32 rows, 8-34 MB of weights at 1-3B) at 1.6-3.2× the time
their weights take to read; a kernel that only streams the same bytes takes 1.1-2.1× (the rest is each launch's
fixed cost, ~2 µs). This one comes within 15-20 % of that stream, 1.3-3.4 µs a launch under cuBLAS, and the norm
that sums its partials pays back 0.3-0.4 µs a split of that: 2-3 % off a 1-3B model's decode step on an H200
(``bench/wsgemm.py``; docs/benchmarks.md, session 24):

- one program per (tile of 64 weight rows, split of K), enough splits that most SMs get a program;
- a one-warp partition copies each stage's ``[BN, 64]`` weight box and the ``[ROWS, 64]`` box of the activations by
  TMA into a ring of ``DEPTH`` shared-memory slots, waiting only for a slot to be freed;
- the default warpgroup multiplies ``W_tile @ x_tile^T`` by wgmma (the weights as the 64/128-row operand, since a
  decode step's rows are fewer than wgmma's 64) and frees each slot once the product that read it is done;
- each split writes its float32 partial product ``[splits, rows, N]``; the norm that reads the projection next sums
  the splits in order, rounds the sum to the model's dtype (as a GEMM writing it out would) and goes on as before.
  No reduce kernel, no atomics: the same bits every time.

A warp-specialised kernel reserves its register budget for each of its warps, the idle ones included: at the
default 256 registers a thread, one program fills an SM's register file, and the kernel ran 1.3-1.7× slower than
with 128 (``maxnreg``), which lets two programs share an SM.

Only CUDA devices of compute capability 9 (the wgmma and TMA instructions), bf16 or fp16 weights, up to
:data:`MAX_ROWS` rows, and shapes the tiles divide: :func:`unavailable` says why not, and everything else keeps
cuBLAS. Gluon is Triton's experimental lower-level dialect; its TMA load is named ``async_copy_global_to_shared`` in
Triton 3.6 and ``async_load`` in 3.9, both taken here.
"""

from __future__ import annotations

import functools

import torch

from . import pdl_launch, split_projections_on

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _GLUON = None
except Exception as exc:  # an older Triton, or one without the NVIDIA backend
    _GLUON = f"Triton's Gluon dialect is not available ({type(exc).__name__}: {exc})"

__all__ = ["MAX_ROWS", "SplitProjection", "TorchSplitProjection", "choose", "unavailable"]

MAX_ROWS = 64
"""The most rows a call takes (wgmma's N side of the swapped product); more rows go to cuBLAS."""

K_BOX = 64  # K per TMA box: 128 bytes of 2-byte elements, the widest swizzled box row
BN = 64  # weight rows per program: 128 was no faster, and needs twice the splits for the same programs
DEPTH = {32: 8, 64: 6}  # ring slots by box of rows: 8 x 12 KB or 6 x 16 KB, two programs per SM either way
MAXNREG = 128  # registers per thread (see the module's docstring)
MIN_SPLIT_BOXES = 4  # each split reads at least this many boxes of K


if _GLUON is None:
    BK = gl.constexpr(K_BOX)

    @gluon.jit
    def _gdc_wait(anchor):
        """``griddepcontrol.wait`` (programmatic dependent launch) for the calling partition's threads; ``anchor``:
        any scalar (inline assembly takes an operand)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r,l", [anchor], dtype=gl.int32,
                                  is_pure=False, pack=1)  # fmt: skip

    @gluon.jit
    def _gdc_launch_dependents(anchor):
        """``griddepcontrol.launch_dependents``: the next kernel may launch (as :func:`_gdc_wait`)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r,l", [anchor],
                                  dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip

    @gluon.jit
    def _producer(wdesc, xdesc, ring_w, ring_x, ready, empty, n0, k0, STAGES: gl.constexpr, PDL: gl.constexpr):
        """One warp: copy stage i's weight box and activation box into slot ``i % DEPTH`` once it is free. PDL
        (launched under programmatic dependent launch, :func:`acb.kernels.pdl_choice`'s level): the weight boxes of
        the ring's first round first (no kernel writes the weights), then the wait for the kernel before, which
        writes the activations; every other copy and the consumer's stores come after that wait. From level 2 the
        next kernel may launch right after it."""
        depth: gl.constexpr = ring_w.type.shape[0]
        first: gl.constexpr = depth if depth < STAGES else STAGES
        start = 0
        if PDL:
            for i in gl.static_range(first):  # fresh slots: nothing to wait for
                mbarrier.expect(ready.index(i), wdesc.block_type.nbytes + xdesc.block_type.nbytes)
                _tma_load(wdesc, [n0, k0 + i * BK], ready.index(i), ring_w.index(i))
            _gdc_wait(n0)
            if PDL >= 2:
                _gdc_launch_dependents(n0)
            for i in gl.static_range(first):
                _tma_load(xdesc, [0, k0 + i * BK], ready.index(i), ring_x.index(i))
            start = first
        for i in range(start, STAGES):
            s = i % depth
            mbarrier.wait(empty.index(s), ((i // depth) & 1) ^ 1)  # a fresh barrier counts as freed once
            mbarrier.expect(ready.index(s), wdesc.block_type.nbytes + xdesc.block_type.nbytes)
            k = k0 + i * BK
            _tma_load(xdesc, [0, k], ready.index(s), ring_x.index(s))
            _tma_load(wdesc, [n0, k], ready.index(s), ring_w.index(s))

    @gluon.jit
    def _consumer(ring_w, ring_x, ready, empty, OUT, n0, split, M, N, STAGES: gl.constexpr, PDL: gl.constexpr,
                  num_warps: gl.constexpr):  # fmt: skip
        """The default warpgroup: ``acc[BN, ROWS] += W_tile @ x_tile^T`` per stage, one product in flight, each slot
        freed when the product that read it is done; then ``OUT[split, m, n0 + i] = acc[i, m]`` for ``m < M``.
        PDL level 2 or more: once the first stage is in (so the producer has waited), the next kernel may launch."""
        depth: gl.constexpr = ring_w.type.shape[0]
        BN: gl.constexpr = ring_w.type.shape[1]
        ROWS: gl.constexpr = ring_x.type.shape[1]
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, ROWS, 16])  # fmt: skip
        acc = gl.zeros([BN, ROWS], gl.float32, MMA)
        if PDL >= 2:  # the first stage's activations are in, so the producer has waited
            mbarrier.wait(ready.index(0), 0)
            _gdc_launch_dependents(n0)
        for i in range(STAGES):
            s = i % depth
            mbarrier.wait(ready.index(s), (i // depth) & 1)
            acc = warpgroup_mma(ring_w.index(s), ring_x.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if i > 0:  # the product of stage i - 1 is done: its slot may be refilled
                mbarrier.arrive(empty.index((i - 1) % depth), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
        rm = gl.arange(0, ROWS, layout=gl.SliceLayout(0, MMA))
        ptr = OUT + split * M * N + rm[None, :] * N + rn[:, None]
        gl.store(ptr, acc, mask=(rm < M)[None, :])

    @gluon.jit
    def _split_projection_kernel(wdesc, xdesc, OUT, M, N, STAGES: gl.constexpr, DEPTH_: gl.constexpr,
                                 PDL: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """Program ``pid``: weight rows ``(pid % tiles) * BN ..`` times split ``pid // tiles`` of K."""
        BN: gl.constexpr = wdesc.block_type.shape[0]
        ROWS: gl.constexpr = xdesc.block_type.shape[0]
        pid = gl.program_id(0)
        tiles = N // BN
        n0 = (pid % tiles) * BN
        split = pid // tiles
        ring_w = gl.allocate_shared_memory(wdesc.dtype, [DEPTH_, BN, BK], wdesc.layout)
        ring_x = gl.allocate_shared_memory(xdesc.dtype, [DEPTH_, ROWS, BK], xdesc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [DEPTH_, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [DEPTH_, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(DEPTH_):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (ring_w, ring_x, ready, empty, OUT, n0, split, M, N, STAGES, PDL, num_warps)),
            (_producer, (wdesc, xdesc, ring_w, ring_x, ready, empty, n0, split * STAGES * BK, STAGES, PDL)),
        ], [1], [24])  # fmt: skip


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why :class:`SplitProjection` cannot run on ``device`` for weights of ``dtype`` (None: it can)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"weights of {dtype} (it takes bf16 and fp16)"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"compute capability {major}.{minor} (it needs Hopper's wgmma and TMA: 9.x)"
    return _GLUON


def choose(weights: list[tuple[torch.Tensor, torch.Tensor]], tensor_parallel: bool = False, make=None, pdl: int = 0):
    """Each layer's (output, down) projections and why not: ``(projections, reason)``, ``projections`` a list of
    pairs (None for a weight whose shape the tiles do not divide, which keeps cuBLAS) and ``reason`` None, or the
    list empty and ``reason`` why the kernel does not run here: the device, the dtype, ``tensor_parallel`` (each
    rank's partial sums go to the all-reduce), ``ACB_SPLIT_PROJECTIONS=0``, or a failure to build. Gluon is Triton's
    experimental dialect and its API moves between releases, so each projection is built and run once on a zero row
    here: on a Triton the kernel does not build on, the engine keeps cuBLAS and says why instead of failing a step.
    ``make``: projections of another kind (the CPU tests' :class:`TorchSplitProjection`), taken as they are.
    ``pdl``: the kernel's projections launch under programmatic dependent launch (:class:`SplitProjection`)."""
    if make is None:
        w = weights[0][0]
        reason = unavailable(w.device, w.dtype)
        if reason is None and tensor_parallel:
            reason = "tensor parallelism (each rank's partial sums go to the all-reduce)"
        if reason is None and not split_projections_on():
            reason = "ACB_SPLIT_PROJECTIONS=0"
        if reason is not None:
            return [], reason
    if make is None:
        build, fits = (lambda w: SplitProjection(w, pdl=pdl)), SplitProjection.fits
    else:
        build, fits = make, getattr(make, "fits", lambda n, k: None)
    try:
        projections = [tuple(build(w) if fits(*w.shape) is None else None for w in pair) for pair in weights]
        if make is None:
            for proj in (p for pair in projections for p in pair if p is not None):
                proj(torch.zeros(1, proj.k, dtype=proj.dtype, device=proj.weight.device))
            torch.cuda.synchronize(weights[0][0].device)
    except Exception as exc:  # noqa: BLE001 (whatever fails in the experimental kernel means: not here)
        if make is not None:
            raise
        return [], f"the split kernel did not build or run here ({type(exc).__name__}: {str(exc)[:200]})"
    return projections, None


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _layout(shape: list[int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


class SplitProjection:
    """``x @ w.T`` for one weight ``w [N, K]``, as float32 partial sums ``[splits, rows, N]``.

    Built once per weight (the weight's TMA descriptor and the tiling are fixed); :meth:`fits` says whether a shape
    can take it, and a call returns the partials, which :func:`acb.kernels.fused.add_rmsnorm` sums."""

    def __init__(self, w: torch.Tensor, splits: int | None = None, depth: int | None = None, pdl: int = 0):
        """``splits`` and ``depth``: the split count and the ring's slots instead of the defaults (bench.wsgemm).
        ``pdl`` (a level of :func:`acb.kernels.pdl_choice`): every call launches under programmatic dependent
        launch: each program copies its first weight boxes while the kernel before (which writes the input) may
        still run, then waits for it; from level 2 it lets the next kernel launch right after."""
        n, k = w.shape
        reason = self.fits(n, k)
        if reason is not None:
            raise ValueError(reason)
        self.n, self.k, self.dtype = n, k, w.dtype
        self.bn = BN
        self.splits = splits or _splits(n, k, BN, _sms(w.device))
        if k % (self.splits * K_BOX):
            raise ValueError(f"{self.splits} splits of whole {K_BOX}-column boxes do not divide {k}")
        self.stages = k // self.splits // K_BOX
        self.depth = depth  # None: by the box of rows (__call__)
        self.pdl = pdl
        self.weight = w  # the descriptor holds its pointer
        self.wdesc = TensorDescriptor.from_tensor(w, [self.bn, K_BOX], _layout([self.bn, K_BOX], w.dtype))

    @staticmethod
    def fits(n: int, k: int) -> str | None:
        """Why a weight of ``n x k`` cannot take this kernel (None: it can)."""
        if n % 64:
            return f"{n} output columns (a multiple of 64 is needed)"
        if k % (MIN_SPLIT_BOXES * K_BOX):
            return f"{k} input columns (a multiple of {MIN_SPLIT_BOXES * K_BOX} is needed)"
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if not 0 < m <= MAX_ROWS or x.shape[1] != self.k:
            raise ValueError(f"SplitProjection takes 1-{MAX_ROWS} rows of {self.k}, got {tuple(x.shape)}")
        if x.stride(1) != 1 or x.stride(0) != self.k or x.data_ptr() % 16:
            x = x.contiguous()
        rows = 32 if m <= 32 else 64
        depth = self.depth or DEPTH[rows]
        xdesc = TensorDescriptor.from_tensor(x, [rows, K_BOX], _layout([rows, K_BOX], x.dtype))
        out = torch.empty(self.splits, m, self.n, dtype=torch.float32, device=x.device)
        _split_projection_kernel[(self.n // self.bn * self.splits,)](
            self.wdesc, xdesc, out, m, self.n, self.stages, depth, self.pdl, num_warps=4, maxnreg=MAXNREG,
            **pdl_launch(self.pdl),
        )  # fmt: skip
        return out


class TorchSplitProjection:
    """The same partial sums in torch, ``splits`` equal shares of K (fewer if they do not divide it): the reference
    of :class:`SplitProjection`'s output, and the projections with which the CPU tests run the lean model's split
    data path (:meth:`acb.lean_model.LeanCausalLM.use_split_projections`)."""

    def __init__(self, w: torch.Tensor, splits: int = 3):
        self.weight = w
        self.splits = next(s for s in range(splits, 0, -1) if w.shape[1] % s == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        share = self.weight.shape[1] // self.splits
        return torch.stack([x[:, i * share : (i + 1) * share].float() @ self.weight[:, i * share : (i + 1) * share]
                            .float().T for i in range(self.splits)])  # fmt: skip


def _splits(n: int, k: int, bn: int, sms: int) -> int:
    """The fewest splits of K (doubling) that give seven SMs in ten a program, none under MIN_SPLIT_BOXES boxes.
    Every split costs the norm after the projection a float32 row to read (~0.3 µs a split at 32 rows), and a
    second program per SM adds little: with the norm, 2-4 splits beat 8 (bench.wsgemm --engine, session 24)."""
    sp = 1
    while 10 * (n // bn * sp) < 7 * sms and k % (2 * sp * K_BOX) == 0 and k // (2 * sp) >= MIN_SPLIT_BOXES * K_BOX:
        sp *= 2
    return sp
