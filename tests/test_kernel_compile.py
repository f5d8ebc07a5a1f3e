"""Every Triton kernel of the GPU fast path compiles for a Hopper card, here on the CPU.

Triton's interpreter (the other CPU tests of the kernels) runs a kernel's Python line by line and does not type it:
a kernel that it runs can still be refused by the compiler on the card. Session 16 lost a device call to one
(a name bound at one shape in a branch and at another in a nested one). Triton lowers a kernel for a target given by
name without a GPU, so CI checks that each variant the engine launches compiles for sm_90, as the card does.
"""

from __future__ import annotations

import re
import warnings

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from acb.kernels import attention as A  # noqa: E402
from acb.kernels import fused as F  # noqa: E402
from acb.kernels import step as S  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn, types: dict[str, str], constexprs: dict, num_warps: int = 4, aligned: tuple[str, ...] = (), **opts):
    """Lower ``fn`` for sm_90; arguments not named in ``types`` or ``constexprs`` are int32; those in ``aligned``
    are multiples of 16 (pointers: 16-byte aligned), as Triton's launcher tells the compiler of such arguments."""
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=TARGET, options={"num_warps": num_warps, **opts})  # fmt: skip


def _compile_gluon(fn, args: list, constexprs: dict, maxnreg: int, aligned: tuple = (), num_warps: int = 4) -> str:
    """Lower the Gluon kernel ``fn`` for sm_90 with ``args`` (every argument, in order, constexprs included) at
    ``maxnreg`` registers a thread, the arguments named in ``aligned`` known to be multiples of 16 (as the launcher
    finds them); returns its PTX."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    signature = {n: "constexpr" if n in constexprs else mangle_type(a) for n, a in zip(fn.arg_names, args)}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = GluonASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()},
                            attrs=attrs)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton.compile(source, target=TARGET, options={"num_warps": num_warps, "maxnreg": maxnreg}).asm["ptx"]


@pytest.fixture(scope="module", autouse=True)
def _backend():
    @triton.jit
    def probe(X):
        triton.language.store(X, 1.0)

    try:
        _compile(probe, {"X": "*fp32"}, {})
    except Exception as exc:  # no CUDA backend or no ptxas in this Triton build
        pytest.skip(f"Triton cannot compile for sm_90 here: {exc!r:.200}")


DECODE_TYPES = {
    **{n: "*bf16" for n in ("Q", "KC", "VC", "KN", "VN", "QW", "KW", "OUT")},
    **{n: "*fp32" for n in ("OP", "MP", "LP", "COS", "SIN")},
    "BT": "*i32", "LENS": "*i32", "POS": "*i64", "SLOT": "*i64", "scale": "fp32", "eps": "fp32",
}  # fmt: skip


@pytest.mark.parametrize(
    "rope, qk_norm, new_kv", [(True, True, True), (True, False, True), (False, False, True), (False, False, False)]
)  # the lean path's decode (with and without q/k norms), the generic path's, the plain kernel
@pytest.mark.parametrize("dim, group, splits", [(64, 4, 2), (96, 1, 1), (256, 4, 8)])
@pytest.mark.parametrize("pdl", [0, 1, 2])
def test_the_decode_kernel_compiles(rope, qk_norm, new_kv, dim, group, splits, pdl):
    if pdl and (rope, qk_norm, new_kv) == (True, False, True):
        pytest.skip("the wait does not depend on the q/k norms: checked with them, and without rope (generic path)")
    consts = dict(GROUP=group, GROUP_PAD=max(16, group), D=dim, D_PAD=triton.next_power_of_2(dim), BLOCK_N=64,
                  PAGE=16, SPLITS=splits, WINDOW=0, PRECISION="tf32", ROPE=rope, QK_NORM=qk_norm,
                  NEW_KV=new_kv, PDL=pdl)  # fmt: skip
    ptx = _compile(A._decode_split_kernel, DECODE_TYPES, consts).asm["ptx"]
    _check_pdl(ptx, pdl)
    if pdl == 1:  # the merge's launch allowed after the last store
        assert ptx.rindex("st.global") < ptx.index("griddepcontrol.launch_dependents")
    if splits > 1:
        types = {"OP": "*fp32", "MP": "*fp32", "LP": "*fp32", "OUT": "*bf16"}
        pad = triton.next_power_of_2
        consts = dict(SPLITS=splits, SPLITS_PAD=pad(splits), D=dim, D_PAD=pad(dim), PDL=pdl)
        merge = _compile(A._decode_merge_kernel, types, consts).asm["ptx"]
        _check_pdl(merge, pdl, trigger_at_exit=True)


def _check_pdl(ptx: str, level: int, trigger_at_exit: bool = False) -> None:
    """Where a Triton kernel compiled at PDL ``level`` waits and lets the next kernel launch: no ``griddepcontrol``
    at level 0; the wait before any global load from level 1; from level 2 the trigger right after the wait, before
    any load too. ``trigger_at_exit``: at level 1 the kernel has no trigger (its programs' exits are)."""
    loads = [i for i in (ptx.find(op) for op in ("ld.global", "cp.async")) if i >= 0]
    assert ("griddepcontrol.wait" in ptx) == (level > 0)
    if level:
        assert ptx.index("griddepcontrol.wait") < min(loads)
    if level >= 2:
        assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents") < min(loads)
    elif trigger_at_exit:
        assert "griddepcontrol.launch_dependents" not in ptx


def test_the_prefill_kernel_compiles():
    types = {"Q": "*bf16", "KC": "*bf16", "VC": "*bf16", "BT": "*i32", "LENS": "*i32", "QSTART": "*i32",
             "OUT": "*bf16", "MAP": "*i32", "scale": "fp32"}  # fmt: skip
    consts = dict(GROUP=4, D=128, D_PAD=128, BLOCK_M=64, BLOCK_N=64, PAGE=16, WINDOW=0, PRECISION="tf32")
    _compile(A._prefill_kernel, types, consts)


@pytest.mark.parametrize("residual, pre", [(True, True), (True, False), (False, True), (False, False)])
def test_the_norm_kernel_compiles(residual, pre):
    types = {n: "*bf16" for n in ("X", "R", "W", "PRE", "OUT")} | {"eps": "fp32"}
    _compile(F._add_rmsnorm_kernel, types, dict(BLOCK=2048, HAS_RES=residual, HAS_PRE=pre, SPLITS=0, PDL=False))
    types["X"] = "*fp32"  # a split projection's partial sums
    for pdl in (1, 2):
        consts = dict(BLOCK=2048, HAS_RES=residual, HAS_PRE=pre, SPLITS=8, PDL=pdl)
        _check_pdl(_compile(F._add_rmsnorm_kernel, types, consts).asm["ptx"], pdl, trigger_at_exit=True)


def test_the_small_kernels_compile():
    _compile(F._argmax_chunk_kernel, {"X": "*bf16", "VAL": "*fp32", "IDX": "*i32"}, {"BLOCK": F._ARGMAX_BLOCK})
    merge_types = {"VAL": "*fp32", "IDX": "*i32", "OUT": "*i64", "TOKENS": "*i64", "SLOTS": "*i64"}
    for into in (False, True):
        _compile(F._argmax_merge_kernel, merge_types, {"CHUNKS_PAD": 32, "INTO": into}, 1)
    step_types = {n: "*i64" for n in S._step_indices_kernel.arg_names[:10]}
    _compile(S._step_indices_kernel, step_types, dict(BS=16, BLOCK=S._BLOCK, COLS=S._COLS))
    for dim, pdl in ((64, 0), (96, 1), (256, 2)):  # the generic path's rotary, at each PDL level
        consts = dict(H=32, H_PAD=32, HKV=8, HKV_PAD=8, D=dim, D_PAD=triton.next_power_of_2(dim), PDL=pdl)
        ptx = _compile(F._rotary_kernel, {n: "*bf16" for n in ("Q", "K", "COS", "SIN", "QO", "KO")}, consts)
        _check_pdl(ptx.asm["ptx"], pdl, trigger_at_exit=True)
    rope_types = {n: "*bf16" for n in ("Q", "K", "V", "KC", "VC")} | {"COS": "*fp32", "SIN": "*fp32", "POS": "*i64",
                                                                      "SLOT": "*i64"}  # fmt: skip
    _compile(F._rope_cache_kernel, rope_types, dict(H=32, H_PAD=32, HKV=8, HKV_PAD=8, HALF=48, HALF_PAD=64))
    _compile(F._silu_mul_kernel, {"GU": "*bf16", "OUT": "*bf16"}, {"BLOCK": 1024})


@pytest.mark.parametrize("block_m", sorted(F._GATE_UP_TILES))
@pytest.mark.parametrize("act", [0, 1])
def test_the_gate_up_kernel_compiles(block_m, act):
    block_n, block_k, warps, _ = F._GATE_UP_TILES[block_m]
    types = {n: "*bf16" for n in ("X", "G", "U", "OUT")}
    for pdl in (0, 1, 2):
        consts = dict(ACT=act, EVEN=True, PRECISION="tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      PDL=pdl)  # fmt: skip
        ptx = _compile(F._gate_up_act_kernel, types, consts, warps).asm["ptx"]
        _check_pdl(ptx, pdl, trigger_at_exit=True)


@pytest.mark.parametrize("rows, bn, dtype", [(32, 64, "bf16"), (64, 64, "fp16"), (64, 128, "bf16")])
@pytest.mark.parametrize("stages, pdl", [(4, 0), (4, 1), (16, 1), (16, 2)])
def test_the_split_projection_compiles(rows, bn, dtype, stages, pdl):
    """The Gluon kernel of the split-K output and down projections (acb.kernels.projection) lowers for sm_90 with
    its register budget: wgmma products, TMA copies, a one-warp producer given back its registers. Under PDL the
    producer copies the ring's first round of weight boxes (all the stages, when fewer), then waits, then copies
    the activations; from level 2 both partitions let the next kernel launch (the producer after its wait)."""
    import torch

    from acb.kernels import projection as P

    if P._GLUON is not None:
        pytest.skip(P._GLUON)
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    w, x = torch.empty(2048, 1024, dtype=tdtype), torch.empty(rows, 1024, dtype=tdtype)
    wdesc = P.TensorDescriptor.from_tensor(w, [bn, P.K_BOX], P._layout([bn, P.K_BOX], tdtype))
    xdesc = P.TensorDescriptor.from_tensor(x, [rows, P.K_BOX], P._layout([rows, P.K_BOX], tdtype))
    consts = {"STAGES": stages, "DEPTH_": P.DEPTH[rows], "PDL": pdl, "num_warps": 4}
    args = [wdesc, xdesc, torch.empty(4, rows, 2048), rows, 2048, stages, P.DEPTH[rows], pdl, 4]
    ptx = _compile_gluon(P._split_projection_kernel, args, consts, P.MAXNREG)
    assert ("griddepcontrol.wait" in ptx) == (pdl > 0)
    if pdl:
        first = min(stages, P.DEPTH[rows])
        assert ptx[: ptx.index("griddepcontrol.wait")].count("cp.async.bulk.tensor") == first
    assert ptx.count("griddepcontrol.launch_dependents") == (2 if pdl >= 2 else 0)
    ptx_type = {"bf16": "bf16", "fp16": "f16"}[dtype]
    assert f"wgmma.mma_async.sync.aligned.m64n{rows}k16.f32.{ptx_type}.{ptx_type}" in ptx
    assert "cp.async.bulk.tensor" in ptx and f".maxnreg {P.MAXNREG}" in ptx
    assert "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx


CHAIN_MODES = ["full", "two producers (a signal warp), traced, spaced polls, rotated",
               "gate 3: sums by red.add, a signal warp", "gate 3, two products in flight",
               "gate 3, 128-row tiles, two consumer warpgroups",
               "gate 4: sums by bf16 red.add, every weight box one box", "gate 5: tasks claimed",
               "gate 5: equal shares", "gate 5: shares by each SM's pace", "gate 5: in waves",
               "gate 5: in waves, polls early", "gate 5: in waves, two producers"]  # fmt: skip


@pytest.mark.parametrize("mode", CHAIN_MODES)
def test_the_chain_bench_compiles(mode):
    """bench.wschain (the megakernel's second and third gates) lowers for sm_90 in the variants it times: the
    producer's wait acquires (and fences the TMA proxy after it), the tiles' counts release, the register budget is
    given back; the third gate's split sums are 16-byte atomic adds of float32, its tile waits poll every stage's
    counters at once and order the copies after them for the whole warp; the fourth gate's bf16 sums are 8-byte
    atomic adds of bf16; the fifth gate's tasks are claimed from a counter (an atomic add whose result is used), or
    each program's share of a phase is cut into its tiles (a tile it has whole is stored, a part of one added), its
    SM's share read by its SM's id, or in waves (the tile waits again, counting boxes; their polls read early)."""
    import torch

    C = pytest.importorskip("bench.wschain")  # (Gluon, as this Triton spells it)
    gate3 = C.RED_SUMS | C.SIGNAL_WARP | C.AHEAD_ONCE | C.TILE_WAITS | C.TRACE
    bits = {CHAIN_MODES[0]: C.FULL, CHAIN_MODES[1]: C.FULL | C.TWO_PRODUCERS | C.SIGNAL_WARP | C.TRACE | C.BACKOFF
                                                   | C.ROTATE,
            CHAIN_MODES[2]: C.FULL & ~C.TICKETS & ~C.FENCES | gate3,
            CHAIN_MODES[3]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.INFLIGHT2,
            CHAIN_MODES[4]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.SIGNAL_WARP,
            CHAIN_MODES[5]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.BF16_SUMS | C.SIGNAL_WARP
                            | C.SAME_BOX,
            CHAIN_MODES[6]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.BF16_SUMS | C.SIGNAL_WARP
                            | C.AHEAD_ONCE | C.DYNAMIC,
            CHAIN_MODES[7]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.BF16_SUMS | C.SIGNAL_WARP
                            | C.AHEAD_ONCE | C.BALANCED,
            CHAIN_MODES[8]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.BF16_SUMS | C.SIGNAL_WARP
                            | C.AHEAD_ONCE | C.BALANCED | C.WEIGHTED,
            CHAIN_MODES[9]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.BF16_SUMS | C.SIGNAL_WARP
                            | C.AHEAD_ONCE | C.BALANCED | C.TILE_WAITS | C.WAVES,
            CHAIN_MODES[10]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.BF16_SUMS | C.SIGNAL_WARP
                             | C.AHEAD_ONCE | C.BALANCED | C.TILE_WAITS | C.WAVES | C.POLL_EARLY,
            CHAIN_MODES[11]: C.FULL & ~C.TICKETS & ~C.FENCES | C.RED_SUMS | C.BF16_SUMS | C.SIGNAL_WARP
                             | C.AHEAD_ONCE | C.BALANCED | C.TILE_WAITS | C.WAVES | C.TWO_PRODUCERS}[mode]  # fmt: skip
    warps, tile = (8, [128, C.TILE[1]]) if mode == CHAIN_MODES[4] else (4, list(C.TILE))
    f32 = bits & C.RED_SUMS and not bits & C.BF16_SUMS
    act = torch.float32 if f32 else torch.bfloat16  # (the activations and outputs)
    w, x = torch.empty(2048, 2048, dtype=torch.bfloat16), torch.empty(32, 2048, dtype=act)
    wdesc = C.TensorDescriptor.from_tensor(w, tile, C._layout(tile))
    xl = C.gl.NVMMASharedLayout(0, 32, 2) if f32 else C._layout([C.ROWS, C.TILE[1]])
    xdesc = C.TensorDescriptor.from_tensor(x, [C.ROWS, C.TILE[1]], xl)
    consts = {"FIRST": 0, "LAST": 3, "DEPTH": 8, "MODE": bits, "num_warps": warps}
    args = [wdesc] * 4 + [xdesc] * 5 + [torch.empty(32, 2048, dtype=act)] * 4 + [2048] * 4 + [32] * 4
    args += [4] * 4 + [8] * 4 + [8] * 4 + [32] * 4  # splits, stages, boxes before the wait, wait targets
    counts = torch.empty(8, dtype=torch.int32)
    args += [torch.empty(8), counts, counts, 132, 16, 0, 3, 8, bits, warps]  # partials, tickets, counters, programs...
    aligned = ("O0", "O1", "O2", "O3", "N0", "N1", "N2", "N3", "PART", "TICK", "CNT")
    ptx = _compile_gluon(C._chain_kernel, args, consts, 128, aligned, warps)
    assert "ld.acquire.gpu.global.b32" in ptx and "fence.proxy.async.global" in ptx
    assert "global.gpu.release.add" in ptx  # the tiles' counts (an atom, or a red where the result goes unused)
    assert "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16" in ptx and "setmaxnreg.dec" in ptx
    traced = bits & C.TRACE != 0
    assert ("globaltimer" in ptx) == traced and ("nanosleep" in ptx) == (bits & C.BACKOFF != 0)
    if f32:
        assert re.search(r"(red|atom)\.global\.gpu\.relaxed\.add\.v4\.f32", ptx)  # one add per 4 columns
    if bits & C.BF16_SUMS:  # (four columns a thread: 8 bytes)
        assert re.search(r"(red|atom)\.global\.gpu\.relaxed\.add\.noftz\.v4\.bf16", ptx) and "v4.f32" not in ptx
    if bits & C.TILE_WAITS:
        assert "bar.warp.sync" in ptx  # the tile waits' lanes, before the copies
    # the products wait for all but one (or two) in flight
    assert bool(re.search(r"wgmma\.wait_group\.sync\.aligned\s+2;", ptx)) == bool(bits & C.INFLIGHT2)
    # the launch's end takes one acquire-release count; the tickets one more each phase (none with red.add)
    assert (ptx.count("atom.global.gpu.acq_rel.add") > 1) == (bits & C.TICKETS != 0)
    # tasks claimed: a relaxed atomic add whose result is read (an atom, not a red)
    assert ("atom.global.gpu.relaxed.add.u32" in ptx) == bool(bits & C.DYNAMIC)
    if bits & C.BALANCED:  # (whole tiles stored, parts added: both, in every phase)
        assert ptx.count("add.noftz.v4.bf16") >= 4 and ptx.count("st.global.v2.b32") >= 4
    assert ("%smid" in ptx) == bool(bits & (C.WEIGHTED | C.TRACE))  # (its share by its SM; the trace says which)
    if bits & C.POLL_EARLY:  # (a task's counters read relaxed, then acquired by a fence once looked at)
        assert "ld.relaxed.gpu.global.b32" in ptx and "fence.acq_rel.gpu; bar.warp.sync" in ptx
