"""Model families: every family with a lean adapter, and mixture-of-experts models on the generic path, give
``model.generate``'s greedy tokens (float32), through both paths and both overlap modes; sliding windows are
exercised (prompts and outputs longer than the window)."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest
import torch
from conftest import first_layer_rows, random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams
from acb.default_model import tiny_model
from acb.families import ADAPTERS, lean_plan

LEAN_FAMILIES = ["mistral", "qwen2-sliding", "gemma3", "phi3"]  # llama, qwen2, qwen3: tests/test_engine.py
MOE = ["mixtral", "qwen3-moe"]

pytestmark = pytest.mark.loops("asyncio")


async def _greedy_matches(arch, path, overlap, make_model, tokenizer, seed=3):
    model, ref = make_model(arch, seed=seed)
    prompts = random_prompts(6, [5, 17, 33, 3, 40, 12], len(tokenizer), seed=seed)
    expected = [reference_greedy(ref, p, 20) for p in prompts]
    config = EngineConfig(block_size=8, max_num_batched_tokens=32, overlap=overlap, fast_path=path == "lean")
    async with Engine(model, tokenizer, config) as engine:

        async def one(i, p):
            await asyncio.sleep(0.002 * i)
            return await engine.generate(p, SamplingParams(max_new_tokens=20, ignore_eos=True))

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        assert engine.fast_path == (path == "lean")
        reason = engine.path_reason
    assert [o.token_ids for o in outs] == expected
    return model, ref, reason


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("path", ["lean", "generic"])
@pytest.mark.parametrize("arch", LEAN_FAMILIES)
async def test_every_family_matches_generate_on_both_paths(arch, path, overlap, make_model, tokenizer):
    model, ref, reason = await _greedy_matches(arch, path, overlap, make_model, tokenizer)
    assert reason.startswith(f"{path} path")
    if path == "lean":  # the model is given back as it was: its own forward still gives transformers' tokens
        prompt = random_prompts(1, [9], len(tokenizer), seed=1)[0]
        assert reference_greedy(model, prompt, 8) == reference_greedy(ref, prompt, 8)


async def test_past_the_last_attention_only_the_sampled_rows_are_computed(make_model, tokenizer):
    """A step with prompts caches every token's keys and values in every layer, but its last layer's output
    projection and MLP, and the head, run on the sampled rows alone (one per sequence): the others' logits would be
    thrown away. The tokens stay ``generate``'s."""
    model, ref = make_model("llama", seed=3)
    prompts = random_prompts(3, [17, 9, 30], len(tokenizer), seed=3)
    expected = [reference_greedy(ref, p, 4) for p in prompts]
    rows = []  # (layer, rows) of every after_attention call
    async with Engine(model, tokenizer, EngineConfig(fast_path=True, overlap=False)) as engine:
        lean = engine._runner.lean
        after = lean.after_attention

        def spy(i, o, residual):
            rows.append((i, o.shape[0]))
            return after(i, o, residual)

        lean.after_attention = spy
        outs = await asyncio.gather(
            *(engine.generate(p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for p in prompts)
        )
    assert [o.token_ids for o in outs] == expected
    last = len(lean.layers) - 1
    steps = [(rows[j][1], rows[j + last][1]) for j in range(0, len(rows), last + 1)]  # (first layer, last layer)
    assert all(r[0] == 0 for r in rows[:: last + 1]) and all(first >= end for first, end in steps)
    prompt_steps = [(first, end) for first, end in steps if first > end]
    assert sum(first for first, _ in prompt_steps) >= 17 + 9 + 30 and all(end <= 3 for _, end in prompt_steps)


@pytest.mark.parametrize("fast_path", [True, False], ids=["lean", "generic"])
async def test_sampled_rows_are_padded_to_a_row_count_the_graphs_captured(fast_path, make_model, tokenizer):
    """With decode graphs (CUDA), a step's sampled rows go past the last attention (the generic path: into the head)
    padded to a graph bucket: cuBLAS then meets only row counts it has loaded a kernel for (a new one stalled a
    fresh process's first batch by ~70 ms). Buckets set by hand here, as the CPU captures no graphs: every step's
    last layer (head) runs 4 rows for at most 3 sequences, and the tokens stay ``generate``'s."""
    import torch

    from acb.lean_model import pad_rows

    model, ref = make_model("llama", seed=4)
    prompts = random_prompts(3, [17, 9, 30], len(tokenizer), seed=4)
    expected = [reference_greedy(ref, p, 4) for p in prompts]
    rows = []
    async with Engine(model, tokenizer, EngineConfig(fast_path=fast_path, overlap=False)) as engine:
        runner = engine._runner
        path = runner.lean if fast_path else runner.generic
        assert path.row_buckets is None  # no graphs on the CPU
        path.row_buckets = [4, 8]
        if fast_path:
            after = path.after_attention
            last = len(path.layers) - 1

            def spy(i, o, residual):
                if i == last:
                    rows.append(o.shape[0])
                return after(i, o, residual)

            path.after_attention = spy
        else:  # transformers' own head, on the rows ``logits_to_keep`` picked
            head = model.lm_head.forward
            model.lm_head.forward = lambda h: rows.append(h.shape[1]) or head(h)
        outs = await asyncio.gather(
            *(engine.generate(p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for p in prompts)
        )
    assert [o.token_ids for o in outs] == expected
    assert rows and set(rows) == {4}
    idx = torch.tensor([5, 2, 7])
    assert pad_rows(idx, [4, 8]).tolist() == [5, 2, 7, 5]
    assert pad_rows(idx, [2, 3]) is idx and pad_rows(idx, [1, 2]) is idx  # fills a bucket; no bucket holds it


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
async def test_eager_steps_pad_their_tokens_to_a_multiple(arch, make_model, tokenizer):
    """On CUDA the lean path's eager steps pad their tokens to a multiple of 16, so that their GEMMs meet only row
    counts the warm-up ran (cuBLAS loads a kernel per row count, stalling every thread the first time). Forced here
    on the CPU: every eager step's first layer runs a multiple of 8 rows, the pad rows never reach attention or the
    cache, and the tokens stay ``generate``'s (Gemma 3: q/k norms, post-norms, scaled embeddings)."""
    model, ref = make_model(arch, seed=5)
    prompts = random_prompts(4, [17, 9, 30, 3], len(tokenizer), seed=5)
    expected = [reference_greedy(ref, p, 6) for p in prompts]
    attended = []
    async with Engine(model, tokenizer, EngineConfig(fast_path=True, overlap=False, cuda_graphs=False)) as engine:
        runner = engine._runner
        assert runner.token_multiple == 1  # the CPU pads nothing by default
        runner.token_multiple = 8
        lean = runner.lean
        rows, attend = first_layer_rows(lean), lean._attend

        def spy_attend(i, lw, q, k, v, x, out=None):
            attended.append((q.shape[0], x.positions.shape[0]))
            return attend(i, lw, q, k, v, x, out)

        lean._attend = spy_attend
        outs = await asyncio.gather(
            *(engine.generate(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in prompts)
        )
    assert [o.token_ids for o in outs] == expected
    assert rows and all(r % 8 == 0 for r in rows) and any(r > 8 for r in rows)
    assert all(q == t for q, t in attended)  # attention sees the step's real tokens only


async def test_a_step_past_8192_tokens_pads_to_whole_128_row_tiles(make_model, tokenizer):
    """Five 1,800-token prompts start in one 9,000-token step: with padding on (forced on the CPU), its first layer
    runs 9,088 rows (a multiple of 128, not only of 16), and the tokens stay ``generate``'s."""
    model, ref = make_model("llama", seed=6)
    prompts = random_prompts(5, [1800], len(tokenizer), seed=6)
    expected = [reference_greedy(ref, p, 3) for p in prompts]
    config = EngineConfig(fast_path=True, overlap=False, max_num_batched_tokens=9000, num_kv_blocks=600)
    async with Engine(model, tokenizer, config) as engine:
        engine._runner.token_multiple = 16
        rows = first_layer_rows(engine._runner.lean)
        outs = await asyncio.gather(
            *(engine.generate(p, SamplingParams(max_new_tokens=3, ignore_eos=True)) for p in prompts)
        )
    assert [o.token_ids for o in outs] == expected
    assert rows[0] == 9088 and all(r % 16 == 0 for r in rows)


def test_the_gemm_warm_up_runs_every_row_count_an_eager_step_meets(make_model, monkeypatch):
    """``gemm_counts``: multiples of the padding up to the step budget, plus the rows the last layer and the head
    meet (the graphs' buckets, or any count without graphs); ``warm_gemms`` runs each layer shape's projections at
    each of them and the head at its own counts."""
    import types

    import torch

    import acb.lean_model as lm
    from acb.families import lean_plan
    from acb.runner import gemm_counts

    assert gemm_counts(64, 16, 8, [1, 2, 4, 8]) == ([1, 2, 4, 8, 16, 32, 48, 64], [1, 2, 4, 8])
    assert gemm_counts(40, 16, 3, None) == ([1, 2, 3, 16, 32, 48], [1, 2, 3])
    assert gemm_counts(5, 1, 2, None) == ([1, 2, 3, 4, 5], [1, 2])
    # past LARGE_STEP tokens a step pads to whole 128-row tiles: the warm-up's counts thin out there alike
    big, _ = gemm_counts(8500, 16, 4, [4])
    assert big[-4:] == [8192, 8320, 8448, 8576] and len(big) == 1 + 8192 // 16 + 3
    assert all(lm.padded_tokens(t, 16) in big for t in (1, 15, 16, 17, 8191, 8192, 8193, 8320, 8321, 8500))
    assert [lm.padded_tokens(t, 16) for t in (1, 16, 17, 8192, 8193)] == [16, 16, 32, 8192, 8320]
    assert lm.padded_tokens(8193, 1) == 8193  # no padding asked, none done
    model, _ = make_model("qwen2", seed=1)  # a Q/K/V bias: the biased GEMM is the one warmed
    lean = lm.LeanCausalLM(model, lean_plan(model)[0], 64)
    seen = []

    def linear(x, w, b=None):
        seen.append((x.shape[0], tuple(w.shape), b is not None, x.is_contiguous()))
        return torch.nn.functional.linear(x, w, b)

    class Functional(types.SimpleNamespace):  # torch.nn.functional, its linear recorded
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

    monkeypatch.setattr(lm, "F", Functional(linear=linear))
    lean.warm_gemms([16, 32], [1, 4])
    lw = lean.layers[0]
    for m in (16, 32):
        assert (m, tuple(lw.qkv_w.shape), True, True) in seen
        assert (m, tuple(lw.o_w.shape), False, True) in seen
        assert (m, tuple(lw.down_w.shape), False, True) in seen
    assert {m for m, w, _, _ in seen if w == tuple(lean.lm_head.shape)} == {1, 4}
    assert len(seen) == 2 * 4 + 2  # one layer: every layer has the same shapes (+ gate/up, unfused on the CPU)


_GATE_UP = """
import torch
from acb.kernels.fused import gate_up_act
torch.manual_seed(0)
for rows, hidden, inter, act in [(1, 256, 128, "silu"), (17, 96, 1500, "gelu_tanh"), (100, 128, 300, "silu")]:
    x = torch.randn(rows, hidden)
    w = torch.randn(2 * inter, hidden) / hidden**0.5
    g, u = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
    f = torch.nn.functional.silu if act == "silu" else lambda t: torch.nn.functional.gelu(t, approximate="tanh")
    torch.testing.assert_close(gate_up_act(x, w, act), f(g) * u, atol=2e-5, rtol=2e-5)
print("ok")
"""


def test_the_fused_gate_up_kernel_equals_the_projection_then_the_activation():
    """The lean path's decode steps on CUDA run gate/up and the activation in one Triton kernel (tile by row count,
    masked edges); Triton's interpreter runs it here on the CPU against torch (float32)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _GATE_UP], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# The end of the interpreter scripts below: each architecture named on the command line served by an engine of the
# script's FAST_PATH (greedy, 4 prompts, 6 tokens), against model.generate; then the script's own after(arch, model).
_GREEDY_EACH_ARCH = """
tok = default_tokenizer()
for arch in sys.argv[1:]:
    model = tiny_model(arch, seed=5)
    ref = tiny_model(arch, seed=5)
    prompts = random_prompts(4, [5, 17, 9, 12], len(tok), seed=2)
    want = [reference_greedy(ref, p, 6) for p in prompts]
    async def main():
        async with Engine(model, tok, EngineConfig(block_size=8, fast_path=FAST_PATH, overlap=False)) as engine:
            outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=6, ignore_eos=True))
                                          for p in prompts))
        return [o.token_ids for o in outs]
    got = asyncio.run(main())
    assert got == want, (arch, got, want)
    assert decode_steps, arch
    decode_steps.clear()
    after(arch, model)
print("ok")
"""

_LEAN_KERNEL_DECODE = (
    """
import asyncio, sys
import torch
sys.path.insert(0, "tests")
from conftest import random_prompts, reference_greedy
from acb import Engine, EngineConfig, SamplingParams
from acb.default_model import default_tokenizer, tiny_model
from acb.kernels.projection import TorchSplitProjection
from acb.runner import ModelRunner

# The lean path's decode steps as on CUDA, run eagerly: every op on its Triton kernel (interpreted), q/k norms,
# rotary and the cache write inside the decode kernel, Gemma 3's sandwich norms fused into the next norm. Steps with
# prompts keep the torch ops.
decode_steps = []
def forward(self, b, d, j=0):
    if not b.decode_only or j:
        return ModelRunner._forward.__wrapped__(self, b, d, j)
    decode_steps.append(b.num_rows)
    self.lean.use_kernels(True)
    if SPLIT:  # the output and down projections as split partial sums (torch), summed by the norm kernel
        self.lean.use_split_projections(True, make=TorchSplitProjection)
    try:
        return self._lean_decode(d, 2)[d.sample_idx]
    finally:
        self.lean.use_kernels(False)
forward.__wrapped__ = ModelRunner._forward
ModelRunner._forward = forward
FAST_PATH = True
SPLIT = "--split" in sys.argv
sys.argv = [a for a in sys.argv if a != "--split"]
def after(arch, model):
    pass
"""
    + _GREEDY_EACH_ARCH
)


def test_the_lean_decode_step_on_the_kernels_gives_generate_s_tokens():
    """The lean path's decode step as CUDA runs it (the forward its graphs capture: the Triton kernels, Qwen3's and
    Gemma 3's per-head q/k norms inside the decode kernel, Gemma 3's post-attention and post-MLP norms inside the next
    norm's kernel), eagerly under Triton's interpreter on the CPU, gives ``model.generate``'s tokens."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-c", _LEAN_KERNEL_DECODE, "llama", "qwen3", "gemma3", "qwen2-sliding"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_the_lean_decode_step_with_split_projections_gives_generate_s_tokens():
    """The same decode step with the output and down projections as split partial sums (their torch twin: the
    Gluon kernel needs a Hopper GPU) summed by the norm kernel, interpreted: ``model.generate``'s tokens (Gemma 3:
    with its post-attention norm applied to the summed partials first)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-c", _LEAN_KERNEL_DECODE, "--split", "llama", "gemma3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
async def test_split_projections_partial_sums_give_generate_s_tokens(arch, overlap, make_model, tokenizer):
    """The output and down projections as split-K partial sums (on the CPU: their torch twin, two or three shares of K),
    summed by the norms that read them (the next layer's, the final one before the head, Gemma 3's with its
    post-attention norm first): ``generate``'s tokens, in steps of at most ``split_rows`` rows; larger steps keep
    the plain projection. Every step here runs through it (64 tokens at most), the first one a chunk of a 100-token
    prompt that samples no row (nothing goes past its last attention, and nothing reaches the projections)."""
    from acb.kernels.projection import TorchSplitProjection

    model, ref = make_model(arch, seed=3)
    prompts = random_prompts(7, [100, 5, 17, 33, 3, 40, 12], len(tokenizer), seed=3)
    expected = [reference_greedy(ref, p, 12) for p in prompts]
    calls = []

    def make(w):
        proj = TorchSplitProjection(w)
        assert proj.splits > 1

        def run(x):
            calls.append(x.shape[0])
            return proj(x)

        return run

    config = EngineConfig(block_size=8, max_num_batched_tokens=64, overlap=overlap, fast_path=True)
    async with Engine(model, tokenizer, config) as engine:
        lean = engine._runner.lean
        assert lean.split_reason == "off" and lean.split_rows == 0  # (the CPU's torch ops)
        lean.use_split_projections(True, make=make)
        assert lean.split_reason is None and lean.split_rows == 64
        outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=12, ignore_eos=True))
                                      for p in prompts))  # fmt: skip
    assert [o.token_ids for o in outs] == expected
    assert calls and 0 < min(calls) and max(calls) <= 64


def test_split_projections_stay_off_where_the_kernel_cannot_run(make_model):
    """``split_reason`` names why the lean model keeps cuBLAS for every projection: off, or the device."""
    from acb.lean_model import LeanCausalLM

    model, _ = make_model("llama", seed=3)
    lean = LeanCausalLM(model, lean_plan(model)[0], 64)
    assert lean.split_reason == "off" and lean.split_rows == 0 and not lean._split
    lean.use_split_projections(True)
    assert lean.split_reason == "not a CUDA device" and lean.split_rows == 0


def test_a_split_kernel_that_does_not_build_keeps_cublas_and_says_why(monkeypatch):
    """Gluon is experimental: each projection is built and run once when chosen, and a failure (here a stand-in
    kernel that raises) leaves every projection on cuBLAS with the reason, instead of failing a step."""
    from acb.kernels import projection

    class Broken:
        fits = staticmethod(projection.SplitProjection.fits)

        def __init__(self, w, pdl=False):
            self.k, self.dtype, self.weight = w.shape[1], w.dtype, w

        def __call__(self, x):
            raise RuntimeError("no such op")

    monkeypatch.setattr(projection, "unavailable", lambda device, dtype: None)
    monkeypatch.setattr(projection, "SplitProjection", Broken)
    w = torch.zeros(64, 256)
    assert projection.choose([(w, w)]) == ([], "the split kernel did not build or run here (RuntimeError: no such op)")
    assert projection.choose([(w, w)], tensor_parallel=True)[1].startswith("tensor parallelism")
    monkeypatch.setenv("ACB_SPLIT_PROJECTIONS", "0")
    assert projection.choose([(w, w)]) == ([], "ACB_SPLIT_PROJECTIONS=0")


def test_where_the_lean_kernels_launch_under_pdl(monkeypatch):
    """Programmatic dependent launch is chosen once, when the lean model picks its kernels: CUDA cards of compute
    capability 9.0 or later, one rank, at the level ACB_PDL names (2 by default, 1, or 0: off; anything else is an
    error); the reason says why not. (The CPU tests' kernels, under Triton's interpreter, never take it.)"""
    from acb.kernels import PDL_EARLY, pdl_choice

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ACB_PDL", raising=False)
    cuda = torch.device("cuda", 0)
    assert pdl_choice(torch.device("cpu"), False) == (0, "not a CUDA device")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pdl_choice(cuda, False) == (PDL_EARLY, None) == (2, None)
    assert pdl_choice(cuda, True) == (0, "tensor parallelism")
    for level in (1, 2):
        monkeypatch.setenv("ACB_PDL", str(level))
        assert pdl_choice(cuda, False) == (level, None)
    monkeypatch.setenv("ACB_PDL", "0")
    assert pdl_choice(cuda, False) == (0, "ACB_PDL=0")
    for bad in ("on", "3", ""):
        monkeypatch.setenv("ACB_PDL", bad)
        with pytest.raises(ValueError, match="ACB_PDL is 0, 1 or 2"):
            pdl_choice(cuda, False)
    monkeypatch.setenv("ACB_PDL", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert pdl_choice(cuda, False)[0] == 0 and "8.9" in pdl_choice(cuda, False)[1]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl_choice(cuda, False) == (0, "Triton's interpreter")


def test_the_generic_paths_kernels_launch_at_its_pdl_level(monkeypatch):
    """The generic path chooses its PDL level once, as the lean path does (none on the CPU), and hands it to every
    kernel of acb it runs: the fused norms and gated MLPs, the rotary kernel inside its forwards, and the decode
    kernel through the attention's metadata. Recorded here with torch twins of the kernels, whose arithmetic the
    other tests check."""
    import torch.nn.functional as F

    import acb.kernels.fused as fused
    from acb import generic_model
    from acb.attention import AttentionMetadata, paged_attention_forward
    from acb.generic_model import GenericCausalLM

    llama = tiny_model("llama")
    generic = GenericCausalLM(llama, None, torch.device("cpu"))
    assert (generic.pdl, generic.pdl_reason) == (0, "not a CUDA device")
    generic.pdl = 2  # as pdl_choice answers on an H100 or H200
    seen = []

    def norm(x, residual, w, eps, pdl=0):
        seen.append(("norm", pdl))
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype) * w

    def gate_up(x, gate, activation, up, pdl=0):
        seen.append(("gate/up", pdl))
        return F.silu(x @ gate.t()) * (x @ up.t())

    def rotary(q, k, cos, sin, pdl=0):
        seen.append(("rotary", pdl))
        return own_rotary(q, k, cos, sin)

    module = sys.modules[type(llama.model.layers[0].self_attn).__module__]
    own_rotary = module.apply_rotary_pos_emb
    monkeypatch.setattr(fused, "add_rmsnorm", norm)
    monkeypatch.setattr(fused, "gate_up_act", gate_up)
    monkeypatch.setattr(fused, "rotary", rotary)
    monkeypatch.setattr(fused, "rotary_fits", lambda *a: True)
    try:
        generic.fuse_norms()
        generic.fuse_mlps()
        generic.fuse_rotary()
        assert generic.fused_norms and generic.fused_mlps and generic.fused_rotary
        seen.clear()  # the checks at start call the kernels plainly
        layer, x = llama.model.layers[0], torch.randn(1, 3, 64)
        layer.input_layernorm(x), layer.mlp(x)
        q, k, cos = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 3, 16)
        module.apply_rotary_pos_emb(q, k, cos, cos)  # outside acb's forwards: the module's own function
        token = generic_model._ROTARY.set(generic.pdl)
        try:
            module.apply_rotary_pos_emb(q, k, cos, cos)
        finally:
            generic_model._ROTARY.reset(token)
        assert seen == [("norm", 2), ("gate/up", 2), ("rotary", 2)]
    finally:
        generic.release()

    class Kernels:  # the decode kernel, as the attention calls it
        def paged_decode(self, q, kv, tables, lens, scale, splits, window=0, new_kv=None, pdl=0):
            seen.append(("decode", pdl))
            return torch.zeros_like(q)

    class KV:
        layers = [None]

    attn = llama.model.layers[0].self_attn
    meta = AttentionMetadata(KV(), None, [], [], None, True, kernels=Kernels(), decode_splits=3, pdl=generic.pdl)
    paged_attention_forward(attn, torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), None,
                            acb_meta=meta)  # fmt: skip
    assert seen[-1] == ("decode", 2)

    class Model(torch.nn.Module):  # what a forward of the generic path hands the model
        config = llama.config

        def forward(self, **kwargs):
            seen.append(("forward", kwargs["acb_meta"].pdl, generic_model._ROTARY.get()))
            return types.SimpleNamespace(logits=torch.zeros(1, 1, 8))

    generic.model, generic.fused_rotary = Model(), [module]
    ids = torch.zeros(1, dtype=torch.long)
    d = types.SimpleNamespace(input_ids=ids, positions=ids, slot_mapping=None, block_tables=None, seq_lens=None,
                              query_start_loc=None)  # fmt: skip
    generic.forward(d, decode_only=True, max_query_len=1, decode_splits=1)
    assert seen[-1] == ("forward", 2, 2)


def test_split_projection_tiling():
    """Which weights the kernel takes (64-row tiles, K in splits of at least four 64-column boxes), and how many
    splits: the fewest that give seven SMs in ten a program on an H200 (132 SMs), as bench.wsgemm --engine chose."""
    from acb.kernels.projection import SplitProjection, _splits

    assert SplitProjection.fits(2048, 8192) is None and SplitProjection.fits(1152, 1024) is None
    assert "64" in SplitProjection.fits(100, 1024) and "256" in SplitProjection.fits(2048, 1000)
    assert _splits(2048, 2048, 64, 132) == 4 and _splits(2048, 8192, 64, 132) == 4  # llama-1b: o, down
    assert _splits(3072, 4096, 64, 132) == 2 and _splits(3072, 8192, 64, 132) == 2  # mistral-3b
    assert _splits(1152, 1024, 64, 132) == 4  # gemma3-1b's o: 72 programs, splits of four boxes at least
    assert _splits(16384, 2048, 64, 132) == 1


def test_the_new_kernels_under_the_interpreter():
    """The decode kernel's q/k norms and its cache write of new keys and values, the norm with a norm before it, the
    graphs' argmax and the generic path's rotary: their tests in tests/gpu/test_kernels.py, in float32 under
    Triton's interpreter (bfloat16 runs on the card)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    path = os.path.join(os.path.dirname(__file__), "gpu", "test_kernels.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k",
           "(qk_norm or pre_norm or argmax_rows or new_kv or rotary_equals or partials) and not dtype1"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:]


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", MOE)
async def test_mixture_of_experts_models_run_the_generic_path(arch, overlap, make_model, tokenizer):
    _, _, reason = await _greedy_matches(arch, "generic", overlap, make_model, tokenizer)
    assert reason == f"generic path: {type(tiny_model(arch)).__name__} has no lean adapter (acb.families)"


@pytest.mark.parametrize("arch", MOE)
def test_a_model_without_an_adapter_says_so_and_fast_path_true_is_refused(arch, tokenizer):
    model = tiny_model(arch)
    family, why = lean_plan(model)
    assert family is None and "no lean adapter" in why
    with pytest.raises(ValueError, match="no lean adapter"):
        Engine(model, tokenizer, EngineConfig(fast_path=True))


@pytest.mark.parametrize(
    "arch, overrides, what",
    [
        ("llama", dict(hidden_act="gelu"), "activation"),
        ("llama", dict(mlp_bias=True), "MLP biases"),
        ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 512}), "rotary scaling"),
        ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
         "partial rotary"),
    ],
)  # fmt: skip
async def test_what_an_adapter_cannot_map_falls_back_to_the_generic_path(arch, overrides, what, tokenizer):
    model = tiny_model(arch, **overrides)
    family, why = lean_plan(model)
    assert family is None and what in why
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        out = await engine.generate([5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert not engine.fast_path and what in engine.path_reason
    assert len(out.token_ids) == 3


def test_every_adapter_is_tested():
    """A family added to the registry needs its tiny config here (and so its generate comparison)."""
    covered = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    covered |= {type(tiny_model(arch)).__name__ for arch in LEAN_FAMILIES}
    assert set(ADAPTERS) == covered


async def test_the_engine_logs_its_path_once_at_start(make_model, tokenizer, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="acb")
    model, _ = make_model("gemma3")
    async with Engine(model, tokenizer, EngineConfig(fast_path=True)):
        pass
    lines = [r.getMessage() for r in caplog.records if "engine started" in r.getMessage()]
    assert lines == ["acb engine started on cpu: lean path: Gemma3ForCausalLM through the gemma3 adapter"]


# -- the generic path's decode graphs: what runs inside them, checked on the CPU ----------------------------------


@pytest.mark.parametrize("tokens", [1, 3, 40], ids=["gather", "gather-3", "dense"])
@pytest.mark.parametrize("arch", MOE)
def test_capturable_experts_equal_transformers_eager_experts(arch, tokens):
    """Inside the decode graphs the experts take :func:`graph_experts_forward` (no data-dependent shapes): the same
    output as transformers' eager loop, whether it gathers each pair's expert (few tokens) or runs every expert."""
    import torch

    from acb.generic_model import GenericCausalLM, graph_experts_forward

    model = tiny_model(arch, seed=2)
    generic = GenericCausalLM(model, kv_cache=None, device=torch.device("cpu"))
    experts = generic._experts[0]
    n = experts.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, experts.gate_up_proj.shape[-1], generator=g)
    k = 2
    picked = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g).softmax(-1)
    own = model.config._experts_implementation  # transformers' default (eager or grouped_mm, by version)
    model.config._experts_implementation = "eager"
    want = experts(x, picked, weights)
    model.config._experts_implementation = own
    with generic.capturable():
        got = experts(x, picked, weights)
        assert got.data_ptr() != want.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graph_experts_forward(experts, x, picked, weights), want, rtol=1e-5, atol=1e-6)
    assert model.config._experts_implementation == own  # given back after the capture


def test_what_keeps_a_generic_model_out_of_decode_graphs_is_named(tokenizer):
    import torch

    from acb.generic_model import GenericCausalLM

    cpu = torch.device("cpu")
    assert GenericCausalLM(tiny_model("llama"), None, cpu).graph_blocker() == "CUDA graphs need CUDA"
    for arch, overrides, blocker in [
        ("llama", {}, None),
        ("mixtral", {}, None),
        ("qwen3-moe", {}, None),
        ("gemma3", dict(attn_logit_softcapping=50.0), "attention soft-capping"),
    ]:
        generic = GenericCausalLM(tiny_model(arch, **overrides), None, cpu)
        generic.kernels = object()  # as on CUDA
        got = generic.graph_blocker()
        assert got == blocker if blocker is None else got.startswith(blocker), (arch, got)
    moe = GenericCausalLM(tiny_model("mixtral"), None, cpu)
    moe.kernels = object()
    moe._experts[0].is_transposed = True
    assert "expert layout" in moe.graph_blocker()
    dynamic = dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    generic = GenericCausalLM(tiny_model("llama", **dynamic), None, cpu)
    generic.kernels = object()
    assert generic.graph_blocker() == "rotary scaling ['dynamic'] compares positions on the host each forward"


def test_only_single_input_norms_that_the_kernel_reproduces_are_fused():
    """The fused-norm check leaves alone a gated norm (two inputs) and a norm whose forward fails on a plain input;
    it fuses a Llama norm (``w * x̂``) and a Gemma norm (``(1 + w) * x̂``). Run here with the torch twin of the
    kernel, as the check is the same on CUDA."""
    import torch

    from acb.generic_model import GenericCausalLM

    class GatedRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(16)), 1e-6

        def forward(self, hidden_states, gate=None):
            return hidden_states * self.weight

    class BrokenRMSNorm(GatedRMSNorm):
        def forward(self, hidden_states):
            raise RuntimeError("needs more than a plain input")

    llama = tiny_model("llama")
    llama.model.extra = torch.nn.ModuleList([GatedRMSNorm(), BrokenRMSNorm()])
    generic = GenericCausalLM(llama, None, torch.device("cpu"))

    def torch_kernel(x, residual, w, eps, pdl=0):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype) * w

    import acb.kernels.fused as fused  # noqa: F401  (the kernel module is importable without CUDA)

    fused_before = fused.add_rmsnorm
    fused.add_rmsnorm = torch_kernel
    try:
        generic.fuse_norms()
    finally:
        fused.add_rmsnorm = fused_before
    names = sorted({type(m).__name__ for m in generic.fused_norms})
    assert names == ["LlamaRMSNorm"] and len(generic.fused_norms) == 5  # 2 layers x 2 + the final norm
    generic.release()
    assert all("forward" not in vars(m) for m in llama.modules())


def test_only_gated_mlps_that_the_gate_up_kernel_reproduces_are_fused():
    """The fused-MLP check fuses Llama's MLP (SiLU) and refuses an MLP with exact (erf) GELU, one with biases, one
    that applies the activation to ``up`` instead of ``gate``, and one with two inputs. Run here with a torch twin of
    the kernel, as the check is the same on CUDA; the engine's release gives every forward back."""
    import torch
    import torch.nn.functional as F

    from acb.generic_model import GenericCausalLM

    class MLP(torch.nn.Module):
        def __init__(self, act=F.silu, bias=False, swapped=False):
            super().__init__()
            self.gate_proj = torch.nn.Linear(16, 24, bias=bias)
            self.up_proj = torch.nn.Linear(16, 24, bias=bias)
            self.down_proj = torch.nn.Linear(24, 16, bias=False)
            self.act_fn, self.swapped = act, swapped

        def forward(self, x):
            g, u = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(g * self.act_fn(u) if self.swapped else self.act_fn(g) * u)

    class TwoInputs(MLP):
        def forward(self, x, scale=1.0):
            return super().forward(x) * scale

    llama = tiny_model("llama")
    llama.model.extra = torch.nn.ModuleList(
        [MLP(act=F.gelu), MLP(bias=True), MLP(swapped=True), TwoInputs(), MLP(act=torch.nn.GELU("tanh"))]
    )
    generic = GenericCausalLM(llama, None, torch.device("cpu"))

    def torch_kernel(x, gate, activation, up, pdl=0):
        act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
        return act(x @ gate.t()) * (x @ up.t())

    import acb.kernels.fused as fused

    kernel_before = fused.gate_up_act
    fused.gate_up_act = torch_kernel
    try:
        generic.fuse_mlps()
        fused_extra = [m for m in llama.model.extra if m in generic.fused_mlps]
        x = torch.randn(1, 5, 16)
        assert torch.allclose(llama.model.extra[4](x), llama.model.extra[4].__class__.forward(llama.model.extra[4], x))
    finally:
        fused.gate_up_act = kernel_before
    assert [type(m).__name__ for m in generic.fused_mlps] == ["LlamaMLP", "LlamaMLP", "MLP"]
    assert fused_extra == [llama.model.extra[4]]  # tanh-GELU: fused; erf GELU, biases, swapped, two inputs: not
    generic.release()
    assert all("forward" not in vars(m) for m in llama.modules())


_DEVICE_ONLY_DECODE = (
    """
import asyncio, sys
import torch
sys.path.insert(0, "tests")
from conftest import first_layer_rows, random_prompts, reference_greedy
from acb import Engine, EngineConfig, SamplingParams
from acb.default_model import default_tokenizer, tiny_model
from acb.generic_model import GenericCausalLM, _FusedRotary
from acb.kernels import attention as kernels
from acb.runner import ModelRunner

# What a decode graph captures, run eagerly: the generic forward reading only device tensors (no host layout), the
# Triton kernels (interpreted), the capturable experts, the fused norms and gated MLPs (these also in the steps with
# prompts of at most 128 tokens, as on CUDA). Prefill keeps the reference attention.
decode_steps, fused_mlps, rotary_calls = [], [], []
def forward(self, b, d, j=0):
    if not self.generic.fused_norms:  # as on CUDA
        self.generic.fuse_norms()
        self.generic.fuse_mlps()
        self.generic.fuse_rotary()
        assert self.generic.fused_norms
        fused_mlps.append(len(self.generic.fused_mlps))
        (module,) = self.generic.fused_rotary  # the model's modeling module: its rotary runs the kernel
        fn = module.apply_rotary_pos_emb
        assert isinstance(fn, _FusedRotary) and fn.users == 1
        kernel = fn.kernel
        fn.kernel = lambda *a, **kw: rotary_calls.append(1) or kernel(*a, **kw)
        q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
        fn(q, k, torch.ones(1, 3, 16), torch.zeros(1, 3, 16))  # outside acb's forwards: the module's own function
        assert not rotary_calls
    if not b.decode_only or j:
        return ModelRunner._forward.__wrapped__(self, b, d, j)
    decode_steps.append(b.num_rows)
    self.generic.kernels = kernels
    try:
        with self.generic.capturable():
            return self._generic_decode(d, 2)[d.sample_idx]
    finally:
        self.generic.kernels = None
forward.__wrapped__ = ModelRunner._forward
ModelRunner._forward = forward
ModelRunner._forward.__wrapped__ = forward.__wrapped__
FAST_PATH = False
def after(arch, model):
    dense = sum(isinstance(getattr(m, "gate_proj", None), torch.nn.Linear) for m in model.modules())
    assert fused_mlps.pop() == dense and (dense > 0) == (arch in ("llama", "gemma3", "qwen3")), arch  # every dense MLP
    assert all("forward" not in vars(m) for m in model.modules())  # norms and MLPs got their forwards back at close
    assert rotary_calls, arch  # every attention layer of every step, prompts included
    rotary_calls.clear()
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    assert not isinstance(module.apply_rotary_pos_emb, _FusedRotary)  # the module's own function again
"""
    + _GREEDY_EACH_ARCH
)


def test_the_generic_decode_graph_forward_reads_only_the_device():
    """The forward the generic path's decode graphs capture (no host-side layout, the Triton kernels, the decode
    kernel writing the new keys and values, the capturable experts, the fused norms: Llama's, Gemma's ``1 + w``,
    Qwen3's per-head; the fused gated MLPs: SiLU, Gemma's tanh-GELU; the modeling module's rotary on the kernel,
    inside acb's forwards only, given back at close), run eagerly under Triton's interpreter on the CPU, gives
    ``model.generate``'s tokens."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-c", _DEVICE_ONLY_DECODE, "llama", "gemma3", "qwen3", "mixtral", "qwen3-moe"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
