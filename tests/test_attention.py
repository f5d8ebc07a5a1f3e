"""The reference paged attention against plain dense causal attention."""

from __future__ import annotations

import math

import pytest
import torch

from acb.attention import AttentionMetadata, paged_attention_reference
from acb.kv_cache import KVCache, ModelShape


def _dense(q, k, v, scale, window=None):
    """Causal attention for one sequence whose last len(q) positions are the queries."""
    n, ctx = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    qp = torch.arange(ctx - n, ctx)[:, None]
    kp = torch.arange(ctx)[None, :]
    mask = kp <= qp
    if window:
        mask &= kp > qp - window
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("case", ["mixed", "decode"])
def test_reference_matches_dense(case, window):
    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 8, 2, 16, 4
    shape = ModelShape(1, heads, kv_heads, dim, 100)
    cache = KVCache(shape, num_blocks=64, block_size=bs, dtype=torch.float32, device=torch.device("cpu"))
    ctx_lens = [1, 5, 8, 13, 31] if case == "mixed" else [3, 9, 16, 17]
    new = [min(c, n) for c, n in zip(ctx_lens, [1, 5, 3, 13, 7])] if case == "mixed" else [1] * len(ctx_lens)
    perm = torch.randperm(64).tolist()  # scattered physical blocks
    tables, ks, vs = [], [], []
    for c in ctx_lens:
        nb = math.ceil(c / bs)
        tables.append([perm.pop() for _ in range(nb)])
        ks.append(torch.randn(c, kv_heads, dim))
        vs.append(torch.randn(c, kv_heads, dim))
    # the cached prefix goes in directly; the new tokens through KVCache.write, as a step would
    for t, k, v, n in zip(tables, ks, vs, new):
        for p in range(k.shape[0] - n):
            cache.layers[0][0, t[p // bs], p % bs] = k[p]
            cache.layers[0][1, t[p // bs], p % bs] = v[p]
    slots = [t[p // bs] * bs + p % bs for t, c, n in zip(tables, ctx_lens, new) for p in range(c - n, c)]
    cache.write(
        0,
        torch.cat([k[-n:] for k, n in zip(ks, new)]),
        torch.cat([v[-n:] for v, n in zip(vs, new)]),
        torch.tensor(slots),
    )
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        kv_cache=cache,
        slot_mapping=torch.tensor(slots),
        query_start_loc=[0, *torch.tensor(new).cumsum(0).tolist()],
        seq_lens=ctx_lens,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_only=case == "decode",
    )
    qs = [torch.randn(n, heads, dim) for n in new]
    out = paged_attention_reference(torch.cat(qs), cache.layers[0], meta, 0.25, sliding_window=window)
    expected = torch.cat([_dense(q, k, v, 0.25, window) for q, k, v in zip(qs, ks, vs)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_softcap_path_matches_sdpa_path_when_cap_is_huge():
    torch.manual_seed(1)
    q = torch.randn(3, 4, 8)
    k = torch.randn(6, 2, 8)
    v = torch.randn(6, 2, 8)
    from acb.attention import _attend

    mask = torch.arange(6)[None, :] <= torch.arange(3, 6)[:, None]
    a = _attend(q, k, v, mask, 0.3, None)
    b = _attend(q, k, v, mask, 0.3, 1e9)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


_GENERIC_KERNELS = """
import torch
from acb.attention import AttentionMetadata, paged_attention_forward
from acb.kernels import attention as kernels
from acb.kv_cache import KVCache, ModelShape

torch.manual_seed(0)
heads, kvh, dim, bs, nblocks = 4, 2, 16, 8, 40
shape = ModelShape(num_layers=1, num_heads=heads, num_kv_heads=kvh, head_dim=dim, vocab_size=10)


class Layer(torch.nn.Module):
    layer_idx = 0


def run(lens, news, window, use_kernels):
    cache = KVCache(shape, nblocks, bs, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    tables = torch.zeros(len(lens), 8, dtype=torch.int64)
    slots, qsl, free = [], [0], list(range(nblocks))
    for i, (ctx, n) in enumerate(zip(lens, news)):
        blocks = [free.pop(0) for _ in range(-(-ctx // bs))]
        tables[i, : len(blocks)] = torch.tensor(blocks)
        # the context before this step, written directly
        for p in range(ctx - n):
            cache.layers[0][:, blocks[p // bs], p % bs] = torch.randn(2, kvh, dim, generator=g)
        slots += [blocks[p // bs] * bs + p % bs for p in range(ctx - n, ctx)]
        qsl.append(qsl[-1] + n)
    t = qsl[-1]
    q = torch.randn(1, heads, t, dim, generator=g)
    k = torch.randn(1, kvh, t, dim, generator=g)
    v = torch.randn(1, kvh, t, dim, generator=g)
    decode = all(n == 1 for n in news)
    meta = AttentionMetadata(
        kv_cache=cache, slot_mapping=torch.tensor(slots), query_start_loc=qsl, seq_lens=list(lens),
        block_tables=tables, decode_only=decode, kernels=kernels if use_kernels else None,
        device_seq_lens=torch.tensor(lens), device_query_start_loc=torch.tensor(qsl), max_query_len=max(news),
        decode_splits=2 if decode and use_kernels else 0,
    )
    out, _ = paged_attention_forward(Layer(), q, k, v, None, scaling=dim**-0.5, acb_meta=meta,
                                     sliding_window=window)
    return out


for lens, news in (([9, 30, 17], [1, 1, 1]), ([9, 30, 17], [9, 12, 1])):
    for window in (None, 6):
        want, got = run(lens, news, window, False), run(lens, news, window, True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_the_generic_path_kernels_equal_the_reference_attention():
    """On CUDA the generic path attends with the Triton kernels; here Triton's interpreter runs them on the CPU,
    decode and prefill, with and without a sliding window, against the reference."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _GENERIC_KERNELS], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize(
    "dtype, dim, tile",
    [
        (torch.bfloat16, 128, (64, 4, 3)),  # llama-8b: three stages, 96 KB
        (torch.bfloat16, 96, (64, 4, 3)),  # Phi-3: padded to 128
        (torch.bfloat16, 256, (64, 4, 2)),  # Gemma: three stages would take 192 KB
        (torch.float32, 128, (64, 4, 2)),
        (torch.float32, 256, (32, 4, 2)),
    ],
)
def test_the_decode_tile_keeps_its_stages_within_shared_memory(dtype, dim, tile):
    """The split kernel's default tile: three stages of K and V tiles only where they take at most 96 KB, so that
    wide heads and float32 still fit an SM's shared memory (bench.attention measured the three stages)."""
    pytest.importorskip("triton")
    from acb.kernels.attention import _decode_tile

    q = torch.empty(1, 4, dim, dtype=dtype)
    assert _decode_tile(q) == tile
    block_n, _, stages = tile
    assert stages * 2 * block_n * (1 << (dim - 1).bit_length()) * q.element_size() <= 128 * 1024


@pytest.mark.parametrize("group", [1, 4, 7])
def test_the_prefill_block_map_lists_each_block_of_query_tokens_once(group):
    """The prefill kernel's programs: one per (sequence, block of query tokens) that holds tokens, in order, for
    decode rows, chunks and whole prompts alike; the spare programs of the bound carry the sequence count (they
    exit), and the map's rows start 16-byte aligned (its length is a multiple of 4)."""
    pytest.importorskip("triton")
    from acb.kernels.attention import _prefill_block_m, prefill_block_map

    news = [1, 1, 37, 16, 17, 1, 300, 2]
    qsl = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()])
    got = prefill_block_map(qsl, sum(news), max(news), group)
    per = _prefill_block_m(max(news), group) // group
    want = [(b, m) for b, n in enumerate(news) for m in range(-(-n // per))]
    assert got.dtype == torch.int32 and got.shape[1] % 4 == 0
    assert [tuple(c) for c in got.t().tolist()[: len(want)]] == want
    assert (got[0, len(want) :] == len(news)).all()


@pytest.mark.parametrize(
    "batch, kv_heads, max_context, want",
    [
        (32, 1, 784, 9),  # gemma3-1b under W-family: 264 programs want 9 splits, 784 positions allow 12
        (32, 2, 784, 5),  # qwen2.5-1.5b
        (32, 8, 784, 2),  # llama-1b
        (33, 8, 8192, 1),  # one split from 33 rows at 8 KV heads: no merge kernel
        (1, 8, 8192, 32),  # at most 32 (the workspace's)
        (1, 8, 100, 1),  # no split shorter than a tile of 64 positions
        (4, 1, 300, 4),
    ],
)
def test_decode_splits_fill_the_gpu_twice_in_tiles_of_64_positions(batch, kv_heads, max_context, want):
    from acb.kernels import decode_splits

    assert decode_splits(batch, kv_heads, max_context, 132) == want
