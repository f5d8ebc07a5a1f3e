"""Triton kernels against the plain-torch reference: bf16 and fp32, odd lengths, GQA, block boundaries.

Runs on CUDA; on a CPU machine, ``TRITON_INTERPRET=1 python -m pytest tests/gpu/test_kernels.py`` runs the same
checks through Triton's interpreter (slow, but it checks the kernels' logic), except the bf16 cases of the kernels
that do arithmetic in bf16 (:data:`BF16_ARITHMETIC`): Triton's interpreter keeps bf16 as uint16 and computes on the
raw bits (two bf16 tiles' ``x * w`` gives values near 1e37; triton-lang/triton#11584, and the maintainers' "we just
don't support it yet" on the fix, #11585), so those run on the card only.

Tolerances: fp32 kernels use IEEE dot products, so they agree with the reference to ~1e-5; bf16 inputs are
compared with atol/rtol 2e-2 (bf16 has 8 mantissa bits; the kernels accumulate in fp32, the reference in bf16 SDPA).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from acb.attention import AttentionMetadata, paged_attention_reference  # noqa: E402
from acb.kernels.attention import paged_decode, paged_prefill  # noqa: E402
from acb.kernels.fused import (  # noqa: E402
    GATE_UP_ROWS,
    add_rmsnorm,
    argmax_into,
    argmax_rows,
    gate_up_act,
    rope_and_cache,
    rotary,
    rotary_fits,
    silu_mul,
)
from acb.kernels.step import step_indices  # noqa: E402
from acb.kv_cache import KVCache, ModelShape  # noqa: E402
from acb.sampling import flag_non_finite  # noqa: E402
from acb.step_inputs import step_indices_torch  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# tests whose kernels multiply or add bf16 values as bf16 (a norm's weight, a dot of raw bf16 tiles, rotary on bf16
# rows): their bf16 cases fail under Triton's interpreter whatever the kernel does (see the module's docstring)
BF16_ARITHMETIC = {
    "test_add_rmsnorm_and_silu_mul", "test_add_rmsnorm_sums_a_split_projections_partials",
    "test_add_rmsnorm_with_a_pre_norm_equals_the_two_norms", "test_decode_matches_reference",
    "test_decode_with_another_tile_matches_reference", "test_decode_with_qk_norm_equals_the_norms_then_rope_and_decode",
    "test_prefill_matches_reference_on_mixed_steps", "test_rotary_equals_transformers_apply_rotary_pos_emb",
    "test_gate_up_act_equals_the_projection_then_the_activation",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _bf16_on_the_card_only(request):
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if DEVICE == "cpu" and params.get("dtype") == torch.bfloat16 and request.node.originalname in BF16_ARITHMETIC:
        pytest.skip("Triton's interpreter computes bf16 arithmetic on the raw bits: bf16 runs on the card")


def _setup(ctx_lens, new, heads, kv_heads, dim, bs, dtype, seed=0):
    torch.manual_seed(seed)
    nblocks = sum(math.ceil(c / bs) for c in ctx_lens) + 3
    shape = ModelShape(1, heads, kv_heads, dim, 100)
    cache = KVCache(shape, nblocks, bs, dtype, torch.device(DEVICE))
    cache.layers[0].normal_()
    perm = torch.randperm(nblocks).tolist()
    tables = [[perm.pop() for _ in range(math.ceil(c / bs))] for c in ctx_lens]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE, dtype=torch.int32)
    qsl = [0, *torch.tensor(new).cumsum(0).tolist()]
    meta = AttentionMetadata(cache, torch.zeros(1), qsl, list(ctx_lens), bt, decode_only=all(n == 1 for n in new))
    q = torch.randn(qsl[-1], heads, dim, device=DEVICE).to(dtype)
    return cache, meta, q


def _replay_once(fn, reset) -> None:
    """Run ``fn`` once (compiling its kernels), capture it in a CUDA graph, ``reset()`` what it wrote, replay the
    graph once and wait for it: the outputs are then the graph's."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    reset()
    graph.replay()
    torch.cuda.synchronize()


def _replayed(step, outs: list[torch.Tensor], kv: torch.Tensor, start: torch.Tensor):
    """What ``step`` writes (``outs`` and the cache ``kv``, which starts as ``start``) when replayed once from a CUDA
    graph (:func:`_replay_once`)."""

    def reset():
        for out in outs:
            out.zero_()
        kv.copy_(start)

    _replay_once(step, reset)
    return [o.clone() for o in outs], kv


def _assert_same_bits(want, got) -> None:
    """Two :func:`_replayed` results hold the same bits: every output and the cache."""
    assert torch.equal(got[1], want[1])
    for g, w in zip(got[0], want[0]):
        assert torch.equal(g, w)


def _decode_step(ctx, meta, dim, bs):
    """A decode step's rotary tables (first halves, fp32), lengths, positions and cache slots (each sequence's last
    position) over ``meta``'s block tables."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=DEVICE).float() / dim))
    angles = torch.arange(300, device=DEVICE).float()[:, None] * inv[None, :]
    lens = torch.tensor(ctx, device=DEVICE, dtype=torch.int32)
    slots = torch.stack([meta.block_tables[i, (c - 1) // bs].long() * bs + (c - 1) % bs for i, c in enumerate(ctx)])
    return angles.cos(), angles.sin(), lens, (lens - 1).long(), slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads, kv_heads, dim", [(8, 2, 64), (14, 2, 64), (4, 4, 16), (32, 8, 128), (8, 8, 96), (4, 1, 256)]
)  # 96: Phi-3 mini (not a power of two); 256: Gemma 3
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_matches_reference(dtype, heads, kv_heads, dim, splits):
    ctx = [1, 15, 16, 17, 100, 257]  # block boundaries at 16
    cache, meta, q = _setup(ctx, [1] * len(ctx), heads, kv_heads, dim, 16, dtype)
    lens = torch.tensor(ctx, device=DEVICE, dtype=torch.int32)
    out = paged_decode(q, cache.layers[0], meta.block_tables, lens, 0.125, splits)
    meta.decode_only = False  # the per-sequence reference loop
    ref = paged_attention_reference(q, cache.layers[0], meta, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [(32, 2, 3), (128, 8, 2)])
@pytest.mark.parametrize("splits", [1, 2])
def test_decode_with_another_tile_matches_reference(dtype, tile, splits):
    """The tiles bench.attention times give the same attention (keys per tile, warps, pipeline stages)."""
    ctx = [1, 15, 16, 17, 100, 257]
    cache, meta, q = _setup(ctx, [1] * len(ctx), 32, 8, 128, 16, dtype)
    lens = torch.tensor(ctx, device=DEVICE, dtype=torch.int32)
    out = paged_decode(q, cache.layers[0], meta.block_tables, lens, 0.125, splits, tile=tile)
    meta.decode_only = False
    ref = paged_attention_reference(q, cache.layers[0], meta, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(8, 2, 64), (32, 8, 128), (8, 8, 96), (4, 1, 256)])
@pytest.mark.parametrize("splits", [1, 3, 5])
@pytest.mark.parametrize("window", [0, 7])
def test_decode_with_rope_equals_rope_and_cache_then_decode(dtype, heads, kv_heads, dim, splits, window):
    """The lean path's decode steps rotate q and k and write the new key and value inside the decode kernel: the
    attention and the cache are those of rope_and_cache followed by the plain decode kernel, whichever split holds
    the new position (lengths at block and split boundaries), and q itself is left unrotated."""
    ctx = [1, 2, 15, 16, 17, 64, 65, 100, 257]
    bs = 16
    cache, meta, q = _setup(ctx, [1] * len(ctx), heads, kv_heads, dim, bs, dtype, seed=3)
    k = torch.randn(len(ctx), kv_heads, dim, device=DEVICE).to(dtype)
    v = torch.randn(len(ctx), kv_heads, dim, device=DEVICE).to(dtype)
    cos, sin, lens, pos, slots = _decode_step(ctx, meta, dim, bs)
    ref_cache, ref_q = cache.layers[0].clone(), q.clone()
    rope_and_cache(ref_q, k, v, cos, sin, pos, slots, ref_cache)
    want = paged_decode(ref_q, ref_cache, meta.block_tables, lens, 0.125, splits, window=window)
    q_in = q.clone()
    got = paged_decode(q, cache.layers[0], meta.block_tables, lens, 0.125, splits, window=window,
                       rope=(k, v, cos, sin, pos, slots))  # fmt: skip
    assert torch.equal(q, q_in)
    # bf16 (what the engine serves) to the bit; in fp32 the two kernels may contract the rotation's multiply-adds
    # differently (an ulp or so)
    tol = dict(atol=0, rtol=0) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.layers[0], ref_cache, **tol)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.skipif(DEVICE == "cpu" or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch: compute capability 9.0 or later")  # fmt: skip
@pytest.mark.parametrize("heads, kv_heads, dim", [(32, 8, 64), (12, 2, 128), (4, 1, 256), (32, 32, 96)])
@pytest.mark.parametrize("splits", [1, 3, 9])
@pytest.mark.parametrize("level", [1, 2])
def test_decode_under_pdl_after_the_projection_that_writes_q_equals_plain_launches(heads, kv_heads, dim, splits, level):
    """``pdl`` (each level) in a CUDA graph of layers, each a matmul writing q, k and v then the decode kernel (the
    lean path's order): the same output and cache bits as plain launches."""
    ctx = [1, 2, 15, 16, 17, 64, 65, 100, 257, 300]
    bs, layers, hidden = 16, 4, 1024
    cache, meta, _ = _setup(ctx, [1] * len(ctx), heads, kv_heads, dim, bs, torch.bfloat16, seed=7)
    cos, sin, lens, pos, slots = _decode_step(ctx, meta, dim, bs)
    n = (heads + 2 * kv_heads) * dim
    x = torch.randn(len(ctx), hidden, device=DEVICE, dtype=torch.bfloat16)
    weights = [torch.randn(hidden, n, device=DEVICE, dtype=torch.bfloat16) / hidden**0.5 for _ in range(layers)]
    start = cache.layers[0].clone()

    def run(pdl: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        kv = start.clone()
        qkv = torch.empty(len(ctx), n, device=DEVICE, dtype=torch.bfloat16)
        q = qkv[:, : heads * dim].view(-1, heads, dim)
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(-1, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
        outs = [torch.empty_like(q) for _ in range(layers)]

        def step():
            for w, out in zip(weights, outs):
                torch.mm(x, w, out=qkv)
                paged_decode(q, kv, meta.block_tables, lens, 0.125, splits, out=out, pdl=pdl,
                             rope=(k, v, cos, sin, pos, slots))  # fmt: skip

        return _replayed(step, outs, kv, start)

    _assert_same_bits(run(0), run(level))


@pytest.mark.skipif(DEVICE == "cpu" or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch: compute capability 9.0 or later")  # fmt: skip
@pytest.mark.parametrize("heads, kv_heads, dim", [(32, 8, 64), (4, 1, 256)])
@pytest.mark.parametrize("splits", [1, 9])
@pytest.mark.parametrize("level", [1, 2])
def test_the_generic_paths_attention_under_pdl_equals_plain_launches(heads, kv_heads, dim, splits, level):
    """The generic path's order in a CUDA graph of layers: the norm, a matmul writing q, k and v (cuBLAS, a plain
    launch), transformers' rotary as acb's kernel, then the decode kernel writing the new keys and values, acb's
    kernels at PDL ``level``: the same output and cache bits as plain launches."""
    ctx = [1, 2, 15, 16, 17, 64, 65, 100, 257, 300]
    bs, layers, hidden, t = 16, 4, 1024, len(ctx)
    cache, meta, _ = _setup(ctx, [1] * t, heads, kv_heads, dim, bs, torch.bfloat16, seed=7)
    _, _, lens, _, slots = _decode_step(ctx, meta, dim, bs)
    n = (heads + 2 * kv_heads) * dim
    x = torch.randn(t, hidden, device=DEVICE, dtype=torch.bfloat16)
    norm_w = (torch.rand(hidden, device=DEVICE) + 0.5).to(torch.bfloat16)
    weights = [torch.randn(hidden, n, device=DEVICE, dtype=torch.bfloat16) / hidden**0.5 for _ in range(layers)]
    cos, sin = (torch.randn(1, t, dim, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    start = cache.layers[0].clone()

    def run(pdl: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        kv = start.clone()
        qkv = torch.empty(t, n, device=DEVICE, dtype=torch.bfloat16)
        q = qkv[:, : heads * dim].view(1, t, heads, dim).transpose(1, 2)  # as the attention modules pass them
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(1, t, kv_heads, dim).transpose(1, 2)
        v = qkv[:, (heads + kv_heads) * dim :].view(t, kv_heads, dim)
        outs = [torch.empty(t, heads, dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(layers)]

        def step():
            for w, out in zip(weights, outs):
                torch.mm(add_rmsnorm(x, None, norm_w, 1e-6, pdl=pdl), w, out=qkv)
                qr, kr = rotary(q, k, cos, sin, pdl=pdl)
                paged_decode(qr[0].transpose(0, 1), kv, meta.block_tables, lens, 0.125, splits, out=out, pdl=pdl,
                             new_kv=(kr[0].transpose(0, 1), v, slots))  # fmt: skip

        return _replayed(step, outs, kv, start)

    _assert_same_bits(run(0), run(level))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(8, 2, 64), (8, 8, 96), (4, 1, 256)])
@pytest.mark.parametrize("splits", [1, 3, 9])  # 9: Gemma 3 1B's at 32 rows, most of them empty at these contexts
def test_decode_with_qk_norm_equals_the_norms_then_rope_and_decode(dtype, heads, kv_heads, dim, splits):
    """Qwen3's and Gemma 3's per-head q/k norms inside the decode kernel (before rotary): the attention and the
    cache are those of add_rmsnorm on each head's q and k, then rope_and_cache and the plain decode kernel."""
    ctx = [1, 15, 16, 17, 64, 65, 100, 257]
    bs = 16
    cache, meta, q = _setup(ctx, [1] * len(ctx), heads, kv_heads, dim, bs, dtype, seed=5)
    q = q * 3  # norms that matter: rows far from unit RMS
    k = (torch.randn(len(ctx), kv_heads, dim, device=DEVICE) * 0.3).to(dtype)
    v = torch.randn(len(ctx), kv_heads, dim, device=DEVICE).to(dtype)
    qw = (torch.rand(dim, device=DEVICE) + 0.5).to(dtype)
    kw = (torch.rand(dim, device=DEVICE) + 0.5).to(dtype)
    cos, sin, lens, pos, slots = _decode_step(ctx, meta, dim, bs)
    ref_cache = cache.layers[0].clone()
    ref_q = add_rmsnorm(q.reshape(-1, dim), None, qw, 1e-6).view_as(q)
    ref_k = add_rmsnorm(k.reshape(-1, dim), None, kw, 1e-6).view_as(k)
    rope_and_cache(ref_q, ref_k, v, cos, sin, pos, slots, ref_cache)
    want = paged_decode(ref_q, ref_cache, meta.block_tables, lens, 0.125, splits)
    q_in, k_in = q.clone(), k.clone()
    got = paged_decode(q, cache.layers[0], meta.block_tables, lens, 0.125, splits,
                       rope=(k, v, cos, sin, pos, slots), qk_norm=(qw, kw, 1e-6))  # fmt: skip
    assert torch.equal(q, q_in) and torch.equal(k, k_in)
    # the same arithmetic; a sum of squares taken in another order may move a bf16 rounding by one step
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.layers[0], ref_cache, **tol)
    torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match="rope"):
        paged_decode(q, cache.layers[0], meta.block_tables, lens, 0.125, splits, qk_norm=(qw, kw, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(8, 2, 64), (8, 8, 96), (4, 1, 256)])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_with_new_kv_equals_the_cache_write_then_decode(dtype, heads, kv_heads, dim, splits):
    """The generic path's decode steps: the kernel writes the new (already rotated) keys and values to the cache,
    then attends, as KVCache.write followed by the plain decode kernel; k and v are strided views, as there."""
    ctx = [1, 15, 16, 17, 64, 65, 100, 257]
    bs = 16
    cache, meta, q = _setup(ctx, [1] * len(ctx), heads, kv_heads, dim, bs, dtype, seed=6)
    kv_new = torch.randn(1, 2 * kv_heads, len(ctx), dim, device=DEVICE).to(dtype)  # [1, heads, T, D] layout
    k, v = kv_new[0, :kv_heads].transpose(0, 1), kv_new[0, kv_heads:].transpose(0, 1)  # [T, Hkv, D], strided
    _, _, lens, _, slots = _decode_step(ctx, meta, dim, bs)
    ref = KVCache(ModelShape(1, heads, kv_heads, dim, 100), cache.layers[0].shape[1], bs, dtype, torch.device(DEVICE))
    ref.layers[0].copy_(cache.layers[0])
    ref.write(0, k, v, slots)
    want = paged_decode(q, ref.layers[0], meta.block_tables, lens, 0.125, splits)
    got = paged_decode(q, cache.layers[0], meta.block_tables, lens, 0.125, splits, new_kv=(k, v, slots))
    assert torch.equal(cache.layers[0], ref.layers[0])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        paged_decode(q, cache.layers[0], meta.block_tables, lens, 0.125, splits, new_kv=(k, v, slots),
                     rope=(k, v, k, k, slots, slots))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim, tokens", [(8, 2, 64, 5), (3, 3, 96, 1), (4, 1, 256, 33)])
def test_rotary_equals_transformers_apply_rotary_pos_emb(dtype, heads, kv_heads, dim, tokens):
    """The generic path's rotary kernel gives what transformers' own function gives, to the bit (each product and
    the sum rounded to the dtype, no fused multiply-add), on the strided layout attention modules pass."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(tokens)
    q = torch.randn(1, tokens, heads, dim, device=DEVICE).to(dtype).transpose(1, 2)
    k = torch.randn(1, tokens, kv_heads, dim, device=DEVICE).to(dtype).transpose(1, 2)
    cos, sin = (torch.randn(1, tokens, dim, device=DEVICE).to(dtype) for _ in range(2))
    assert rotary_fits(q, k, cos, sin)
    want, got = apply_rotary_pos_emb(q, k, cos, sin), rotary(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not rotary_fits(q, k, cos[..., : dim // 2], sin[..., : dim // 2])  # partial rotary: not this kernel
    assert not rotary_fits(q, k, cos.float(), sin.float()) or dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [96, 1152])
def test_add_rmsnorm_with_a_pre_norm_equals_the_two_norms(dtype, width):
    """Gemma 3's post-attention and post-MLP norms fused into the next norm: the same result and the same residual
    as the two calls they replace; in bf16 (what the engine serves) to the bit. In fp32 the compiler may contract
    the fused kernel's multiply-adds differently (an H200 differed by an ulp, session 16)."""
    torch.manual_seed(4)
    x = (torch.randn(7, width, device=DEVICE) * 5).to(dtype)
    r = torch.randn(7, width, device=DEVICE).to(dtype)
    pre = (torch.rand(width, device=DEVICE) + 0.5).to(dtype)
    w = (torch.rand(width, device=DEVICE) + 0.5).to(dtype)
    r_want = r.clone()
    want = add_rmsnorm(add_rmsnorm(x, None, pre, 1e-6), r_want, w, 1e-6)
    got = add_rmsnorm(x, r, w, 1e-6, pre)
    tol = dict(atol=0, rtol=0) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(r, r_want, **tol)
    plain = add_rmsnorm(add_rmsnorm(x, None, pre, 1e-6), None, w, 1e-6)
    torch.testing.assert_close(add_rmsnorm(x, None, w, 1e-6, pre), plain, **tol)
    assert not torch.allclose(got.float(), add_rmsnorm(x, r_want.clone(), w, 1e-6).float(), atol=1e-2)  # pre counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(1, 50), (3, 4096), (33, 4097)])
def test_argmax_into_writes_each_rows_argmax_at_its_slot_and_flags_rows_that_are_not_finite(dtype, rows, vocab):
    """The decode graphs' greedy sample in two kernels: the token buffer gets ``argmax`` at each row's slot (other
    slots untouched), and the returned tokens are ``flag_non_finite``'s, -1 where a row holds a NaN or +inf or
    only -inf."""
    torch.manual_seed(rows)
    x = torch.randint(-3, 3, (rows, vocab), device=DEVICE).to(dtype)  # ties, across chunks too
    if rows > 2:
        x[0, vocab - 1] = float("nan")
        x[1, 3] = float("inf")
        x[2] = float("-inf")
    slots = torch.randperm(2 * rows + 1, device=DEVICE)[:rows]
    buf = torch.full((2 * rows + 1,), -7, dtype=torch.int64, device=DEVICE)
    got = argmax_into(x, buf, slots)
    greedy = argmax_rows(x)
    want = buf.clone().fill_(-7)
    want[slots] = greedy
    assert torch.equal(buf, want)
    assert torch.equal(got, flag_non_finite(x, greedy, greedy))
    assert (got[:3] == -1).all() == (rows > 2) and torch.equal(got[3:], x[3:].argmax(-1))


@pytest.mark.parametrize(
    "rows, tokens_per_row, max_blocks",
    [(32, 1, 49), (5, 1, 300), (3, 250, 20), (0, 0, 8)],
    ids=["decode", "long-tables", "prompts", "empty"],
)
def test_step_indices_equal_the_torch_derivation(rows, tokens_per_row, max_blocks):
    """A step's input ids, cache slots and block tables from one kernel, as torch derives them (tables wider than a
    program's columns, more tokens than one program takes, rows reading the host's ids or their last sample),
    reading fields in place at offsets of one buffer as the staged layout does."""
    torch.manual_seed(rows + max_blocks)
    bs, num_slots = 16, 40
    t = rows * tokens_per_row
    tables = torch.randint(0, 10_000, (num_slots + 1, max_blocks), device=DEVICE)
    token_buf = torch.randint(0, 50_000, (num_slots + 1,), device=DEVICE)
    buf = torch.zeros(3 + 4 * t + rows, dtype=torch.int64, device=DEVICE)  # fields at odd offsets of one buffer
    host_ids, from_device, token_rows, positions = (buf[3 + k * t : 3 + (k + 1) * t] for k in range(4))
    slots = buf[3 + 4 * t :]
    slots.copy_(torch.randperm(num_slots + 1, device=DEVICE)[:rows])
    token_rows.copy_(torch.arange(rows, device=DEVICE).repeat_interleave(tokens_per_row))
    host_ids.random_(0, 50_000)
    from_device.copy_(torch.randint(0, 2, (t,), device=DEVICE))
    positions.random_(0, max_blocks * bs)
    args = (host_ids, from_device, token_rows, positions, slots, token_buf, tables, bs)
    for got, want in zip(step_indices(*args), step_indices_torch(*args)):
        assert got.dtype == torch.int64 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(1, 50), (3, 4096), (33, 4097), (8, 128256)])
def test_argmax_rows_equals_torch_argmax(dtype, rows, vocab):
    """The decode graphs' greedy argmax: the first column of each row's largest value, across its chunks."""
    torch.manual_seed(rows)
    x = torch.randn(rows, vocab, device=DEVICE).to(dtype)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    x = torch.randint(-3, 3, (rows, vocab), device=DEVICE).to(dtype)  # ties everywhere, across chunks
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    x[:, vocab // 2 :] = 2  # the largest value in a later chunk too: still its first column
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert argmax_rows(x[:, :0].reshape(0, vocab)).shape == (0,)


def test_argmax_rows_lands_on_a_value_that_is_not_finite_where_a_row_has_one():
    """What acb.sampling.flag_non_finite reads: a NaN or +inf row gives a column holding NaN or +inf, an all -inf
    row gives column 0 (a -inf); finite rows beside them are unaffected."""
    x = torch.randn(5, 9000, device=DEVICE)
    want = x.argmax(-1)
    x[0, 7000] = float("nan")
    x[1, 100], x[1, 8000] = float("inf"), float("nan")
    x[2] = float("-inf")
    x[3, 4096] = float("inf")
    got = argmax_rows(x)
    assert got[0] == 7000 and got[1] == 100 and got[2] == 0 and got[3] == 4096 and got[4] == want[4]
    assert not torch.isfinite(x.gather(-1, got[:, None])[:4]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("dim", [64, 96, 256])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (6, 1), (14, 2), (32, 1)])
@pytest.mark.parametrize("new", [[1, 5, 20, 1, 130, 3], [1, 1, 2, 1, 3, 1]])
def test_prefill_matches_reference_on_mixed_steps(dtype, window, dim, heads, kv_heads, new):
    """Query heads of a KV head share a tile: groups of 4, 1 (no sharing), 6 and 7 (not dividing the tile) and 32
    (larger than a decode-like tile). ``new``: whole prompts, chunks continuing a cached prefix and decodes; or only
    a few tokens per sequence (the small tile)."""
    ctx = [1, 5, 33, 64, 130, 17]
    cache, meta, q = _setup(ctx, new, heads, kv_heads, dim, 16, dtype, seed=1)
    lens = torch.tensor(ctx, device=DEVICE, dtype=torch.int32)
    qsl = torch.tensor(meta.query_start_loc, device=DEVICE, dtype=torch.int32)
    out = paged_prefill(q, cache.layers[0], meta.block_tables, lens, qsl, max(new), 0.2, window=window)
    ref = paged_attention_reference(q, cache.layers[0], meta, 0.2, sliding_window=window or None)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 96])
def test_rope_and_cache_write(dtype, dim):
    torch.manual_seed(2)
    t, heads, kvh, bs = 7, 6, 2, 4
    shape = ModelShape(1, heads, kvh, dim, 100)
    cache = KVCache(shape, 8, bs, dtype, torch.device(DEVICE))
    q = torch.randn(t, heads, dim, device=DEVICE).to(dtype)
    k = torch.randn(t, kvh, dim, device=DEVICE).to(dtype)
    v = torch.randn(t, kvh, dim, device=DEVICE).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=DEVICE).float() / dim))
    angles = torch.arange(50, device=DEVICE).float()[:, None] * inv[None, :]
    cos, sin = angles.cos(), angles.sin()
    pos = torch.tensor([0, 1, 2, 9, 10, 40, 49], device=DEVICE)
    slots = torch.tensor([3, 4, 5, 30, 31, 0, 17], device=DEVICE)
    q_in = q.clone()
    rope_and_cache(q, k, v, cos, sin, pos, slots, cache.layers[0])

    def rot(x):
        c = torch.cat([cos[pos], cos[pos]], -1)[:, None, :]
        s = torch.cat([sin[pos], sin[pos]], -1)[:, None, :]
        half = x.shape[-1] // 2
        rh = torch.cat([-x[..., half:], x[..., :half]], -1)
        return (x.float() * c + rh.float() * s).to(dtype)

    torch.testing.assert_close(q.float(), rot(q_in).float(), **TOL[dtype])
    flat_k = cache.layers[0][0].view(-1, kvh, dim)
    flat_v = cache.layers[0][1].view(-1, kvh, dim)
    torch.testing.assert_close(flat_k[slots].float(), rot(k).float(), **TOL[dtype])
    torch.testing.assert_close(flat_v[slots], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize(
    "hidden, inter", [(256, 128), (96, 1500), (128, 14336)]
)  # even tiles; masked K and columns; wide tiles at 128 rows
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 64, 100, GATE_UP_ROWS])
def test_gate_up_act_equals_the_projection_then_the_activation(dtype, activation, hidden, inter, rows):
    """The decode steps' fused gate/up kernel against cuBLAS's product rounded to the dtype, then the activation
    (what the lean path runs for more rows): the same roundings, so only the sums' order differs."""
    torch.manual_seed(rows)
    x = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    w = (torch.randn(2 * inter, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    g, u = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
    if activation == "silu":
        act = torch.nn.functional.silu(g.float())
    else:
        act = torch.nn.functional.gelu(g.float(), approximate="tanh")
    ref = act.to(dtype) * u
    got = gate_up_act(x, w, activation)
    assert got.shape == (rows, inter) and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("rows", [3, 100])
def test_gate_up_act_reads_gate_and_up_apart_as_it_reads_them_together(rows):
    """transformers' MLP modules hold gate and up in two tensors (the generic path): the same kernel, the same bits."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 64, device=DEVICE)
    gate, up = torch.randn(96, 64, device=DEVICE) / 8, torch.randn(96, 64, device=DEVICE) / 8
    together = gate_up_act(x, torch.cat([gate, up]), "gelu_tanh")
    assert torch.equal(gate_up_act(x, gate, "gelu_tanh", up=up), together)
    with pytest.raises(ValueError, match="contiguous"):
        gate_up_act(x, gate.t().contiguous().t(), up=up)


def test_gate_up_act_refuses_more_rows_than_it_is_tuned_for():
    x = torch.zeros(GATE_UP_ROWS + 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        gate_up_act(x, torch.zeros(256, 64, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits, width, pre", [(1, 96, False), (3, 96, True), (8, 1152, False)])
def test_add_rmsnorm_sums_a_split_projections_partials(dtype, splits, width, pre):
    """Partial sums ``[splits, rows, n]`` (float32) in place of the projection's output: the same norm and the same
    residual as the splits added in order and rounded to the model's dtype, to the bit; a split left out shows."""
    torch.manual_seed(5)
    parts = torch.randn(splits, 7, width, device=DEVICE) * 3
    r = torch.randn(7, width, device=DEVICE).to(dtype)
    w = (torch.rand(width, device=DEVICE) + 0.5).to(dtype)
    pw = (torch.rand(width, device=DEVICE) + 0.5).to(dtype) if pre else None
    whole = parts[0].clone()
    for p in parts[1:]:
        whole += p
    r_want = r.clone()
    want = add_rmsnorm(whole.to(dtype), r_want, w, 1e-6, pw)
    got = add_rmsnorm(parts, r, w, 1e-6, pw)
    assert got.dtype == dtype and got.shape == (7, width)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(r, r_want, atol=0, rtol=0)
    torch.testing.assert_close(add_rmsnorm(parts, None, w, 1e-6), add_rmsnorm(whole.to(dtype), None, w, 1e-6),
                               atol=0, rtol=0)  # fmt: skip
    if splits > 1:
        assert not torch.allclose(add_rmsnorm(parts[1:], r_want.clone(), w, 1e-6, pw).float(), want.float(), atol=1e-2)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k", [(2048, 2048), (2048, 8192), (1152, 1024), (3072, 4096), (640, 256)])
@pytest.mark.parametrize("rows", [1, 7, 32, 33, 64])
def test_split_projection_matches_a_float32_product(dtype, n, k, rows):
    """The split-K projection's partials add up to ``x @ w.T`` (float32 products of the same inputs), at every row
    count a call takes (a single row, fewer than a box, a box, one past it, two boxes), in splits that each cover
    their own part of K; its rows past ``rows`` are never written."""
    from acb.kernels.projection import SplitProjection

    torch.manual_seed(6)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    proj = SplitProjection(w)
    parts = proj(x)
    assert parts.shape == (proj.splits, rows, n) and parts.dtype == torch.float32
    want = x.float() @ w.float().T
    torch.testing.assert_close(parts.sum(0), want, atol=2e-3, rtol=2e-3)
    if proj.splits > 1:  # each split is its own share of K
        share = k // proj.splits
        torch.testing.assert_close(parts[1], x[:, share : 2 * share].float() @ w[:, share : 2 * share].float().T,
                                   atol=2e-3, rtol=2e-3)  # fmt: skip
    again = proj(x[: max(1, rows - 1)].clone())  # a second call, fewer rows: nothing left from the first
    torch.testing.assert_close(again.sum(0), want[: max(1, rows - 1)], atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError):
        proj(torch.randn(65, k, device=DEVICE).to(dtype))


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU")
@pytest.mark.parametrize("rows, hidden, inter", [(32, 2048, 8192), (7, 1152, 6912), (64, 1024, 2048)])
@pytest.mark.parametrize("level", [1, 2])
def test_a_layers_kernels_under_pdl_in_a_graph_equal_plain_launches(rows, hidden, inter, level):
    """The lean path's MLP chain in a CUDA graph of layers, each kernel of it launched under programmatic dependent
    launch (each level): a matmul (plain), the norm, gate/up, the split down projection (its first weight boxes
    copied before its wait), the norm that sums its partials, and so on: the same bits as plain launches. A kernel
    that read its input before its wait, or wrote before it, would read the previous layer's values."""
    from acb.kernels.projection import SplitProjection

    torch.manual_seed(9)
    layers = 4
    x0 = torch.randn(rows, hidden, device=DEVICE, dtype=torch.bfloat16)
    mats = [torch.randn(hidden, hidden, device=DEVICE, dtype=torch.bfloat16) / hidden**0.5 for _ in range(layers)]
    ups = [torch.randn(2 * inter, hidden, device=DEVICE, dtype=torch.bfloat16) / hidden**0.5 for _ in range(layers)]
    down_ws = [torch.randn(hidden, inter, device=DEVICE, dtype=torch.bfloat16) / inter**0.5 for _ in range(layers)]
    w = (torch.rand(hidden, device=DEVICE) + 0.5).to(torch.bfloat16)

    def run(pdl: int) -> tuple[torch.Tensor, torch.Tensor]:
        downs = [SplitProjection(dw, pdl=pdl) for dw in down_ws]
        residual = torch.empty_like(x0)
        out = torch.empty_like(x0)

        def chain():
            residual.copy_(x0)
            h = x0
            for m, up, down in zip(mats, ups, downs):
                a = torch.mm(h, m)
                normed = add_rmsnorm(a, residual, w, 1e-6, pdl=pdl)
                parts = down(gate_up_act(normed, up, "silu", pdl=pdl))
                h = add_rmsnorm(parts, residual, w, 1e-6, pdl=pdl)
            out.copy_(h)

        _replay_once(chain, out.zero_)
        return out.clone(), residual.clone()

    want = run(0)
    got = run(level)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_and_silu_mul(dtype):
    torch.manual_seed(3)
    x = torch.randn(5, 96, device=DEVICE).to(dtype)
    r = torch.randn(5, 96, device=DEVICE).to(dtype)
    w = torch.randn(96, device=DEVICE).to(dtype)
    r0 = r.clone()
    out = add_rmsnorm(x, r, w, 1e-6)
    s = x.float() + r0.float()
    ref = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * w
    torch.testing.assert_close(r.float(), s.to(dtype).float(), **TOL[dtype])
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    plain = add_rmsnorm(x, None, w, 1e-6)
    ref2 = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * w
    torch.testing.assert_close(plain.float(), ref2.float(), **TOL[dtype])
    gu = torch.randn(5, 2 * 1500, device=DEVICE).to(dtype)
    ref3 = torch.nn.functional.silu(gu[:, :1500].float()).to(dtype) * gu[:, 1500:]
    torch.testing.assert_close(silu_mul(gu).float(), ref3.float(), **TOL[dtype])
