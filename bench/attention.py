"""Decode attention against its KV-reading floor: the split kernel's tiles and splits, and the prefill kernel that a
mixed step runs its decode rows through, at the shapes decode steps meet.

A decode step's attention reads every row's context once (K and V of each layer), so it should run at the card's
copy bandwidth. In the engine it takes ~1.3× that (docs/benchmarks.md: W-side's 1.02 ms for ~3.2 GB on an H200),
and in W-share's mixed steps under ``longest_first`` the decode rows seemed to cost far more. Per row count and
context length (llama-8b's geometry by default: 32 query heads on 8 KV heads of 128, blocks of 16 positions, the
blocks of each sequence scattered), this times one layer's attention inside a CUDA graph:

- ``paged_decode`` with the engine's choice (``decode_splits``, tile ``(BLOCK_N, warps, stages)`` of the kernel's
  defaults), then every split count and tile of the grid below; each checked against the engine's choice first;
- ``paged_prefill`` over the same rows, one query token each: what a step that also starts prompts runs.

    python -m bench.attention --rows 32,128,256 --contexts 512,1500,4000 --json out.json
    python -m bench.attention --rows 32 --contexts 512 --shape 32,8,64    # llama-1b's geometry (W-family)

``--after-gemm HIDDEN`` times instead a layer's Q/K/V projection (cuBLAS, ``HIDDEN`` inputs, its own weights per
layer) followed by its attention as the lean path's decode runs it (rotary and the new key and value written by the
kernel), the attention kernels launched plainly and under programmatic dependent launch (``paged_decode``'s
``pdl``). Each layer of the graph has its own weights and cache::

    python -m bench.attention --after-gemm 2048 --rows 32 --contexts 256,512,768 --shape 32,8,64 --max-model-len 784

``--prefill`` times instead the prefill kernel on steps shaped like W-share's that start prompts (whole prompts of
its length law, beside decode rows of long contexts), launched two ways: one program per block of query tokens
that exist (``prefill_block_map``, the engine's), and ``max_query_len``'s worth of programs for every sequence,
the empty ones returning at once (the launch before 2026-11-28)::

    python -m bench.attention --prefill --json out.json

The table gives µs per call, the share of copy bandwidth reached, and the best variant per shape; a variant moves
into the engine (``acb.kernels.decode_splits``, ``paged_decode``'s defaults) only if it wins where steps spend their
time.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from acb.kernels import decode_splits
from acb.kernels.attention import _prefill_block_m, paged_decode, paged_prefill, prefill_block_map

from .gemm import _time, card_and_bandwidth, write_json

SPLITS = [1, 2, 4, 8]
TILES = [(b, w, s) for b, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3)) if not (b == 128 and w == 4)]
PAGE = 16
CALLS = 8  # calls per graph replay, cycling through copies of the KV cache that together exceed L2 many times


def _case(rows: int, ctx: int, heads: int, kv_heads: int, dim: int, copies: int, seed: int = 0):
    """``copies`` KV caches of ``rows`` sequences of ``ctx`` positions each (blocks shuffled), queries, tables."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = rows * -(-ctx // PAGE)
    caches = [
        torch.randn(2, blocks + 1, PAGE, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(copies)
    ]
    tables = torch.randperm(blocks, device="cuda", generator=g).view(rows, -1).to(torch.int32)
    lens = torch.full((rows,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(rows, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    return caches, tables, lens, q


def measure(
    rows: int,
    ctx: int,
    bandwidth: float,
    max_model_len: int,
    heads: int = 32,
    kv_heads: int = 8,
    dim: int = 128,
    splits_grid: list[int] = SPLITS,
    tiles: list[tuple[int, int, int]] = TILES,
) -> list[dict]:
    kv_bytes = rows * ctx * kv_heads * dim * 2 * 2  # K and V, bf16, one layer
    copies = min(CALLS, max(2, -(-(256 << 20) // kv_bytes)))
    caches, tables, lens, q = _case(rows, ctx, heads, kv_heads, dim, copies)
    caches = [caches[i % copies] for i in range(CALLS)]
    scale = dim**-0.5
    floor_us = kv_bytes / bandwidth * 1e6
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = decode_splits(rows, kv_heads, max_model_len, sms)  # as the decode graphs choose
    res = torch.empty_like(q)
    ref = paged_decode(q, caches[0], tables, lens, scale, chosen).clone()

    def row(kernel: str, splits: int | None, tile, fn) -> dict:
        out = dict(rows=rows, ctx=ctx, kernel=kernel, splits=splits, tile=tile, floor_us=round(floor_us, 2),
                   shape=[heads, kv_heads, dim])  # fmt: skip
        try:
            got = fn(0)
            ok = bool(torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=2e-2))
            us = _time(fn, CALLS)
        except Exception as exc:  # a tile that does not fit the SM (shared memory, registers): recorded, skipped
            return dict(out, us=None, equal=False, error=repr(exc)[:200])
        return dict(out, us=round(us, 2), of_bandwidth=round(floor_us / us, 3), equal=ok)

    results = [row("decode, engine's choice", chosen, None,
                   lambda i: paged_decode(q, caches[i], tables, lens, scale, chosen, out=res))]  # fmt: skip
    for splits, tile in itertools.product(splits_grid, tiles):
        if splits > 1 and ctx // splits < tile[0]:
            continue
        results.append(row("decode", splits, tile,
                           lambda i, s=splits, t=tile: paged_decode(q, caches[i], tables, lens, scale, s, out=res,
                                                                    tile=t)))  # fmt: skip
    starts = torch.arange(rows + 1, device="cuda", dtype=torch.int32)
    results.append(row("prefill kernel (a mixed step's decode rows)", None, None,
                       lambda i: paged_prefill(q, caches[i], tables, lens, starts, 1, scale, out=res)))  # fmt: skip
    return results


def measure_after_gemm(
    rows: int, ctx: int, bandwidth: float, max_model_len: int, heads: int, kv_heads: int, dim: int, hidden: int
) -> list[dict]:
    """µs per layer of Q/K/V (cuBLAS) then attention, with ``pdl`` off and on, and of each part alone."""
    kv_bytes = rows * ctx * kv_heads * dim * 2 * 2
    n = (heads + 2 * kv_heads) * dim
    floor_us = (kv_bytes + hidden * n * 2) / bandwidth * 1e6
    caches, tables, lens, _ = _case(rows, ctx, heads, kv_heads, dim, CALLS)
    weights = [torch.randn(hidden, n, device="cuda", dtype=torch.bfloat16) / hidden**0.5 for _ in range(CALLS)]
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    qkv = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : heads * dim].view(rows, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
    angles = torch.arange(max_model_len, device="cuda")[:, None] * torch.rand(dim // 2, device="cuda")[None, :]
    cos, sin = angles.cos(), angles.sin()
    positions = (lens - 1).long()
    slots = tables.gather(1, (positions // PAGE)[:, None]).squeeze(1).long() * PAGE + positions % PAGE
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = decode_splits(rows, kv_heads, max_model_len, sms)
    scale, res = dim**-0.5, torch.empty_like(q)

    def attention(i: int, pdl: bool) -> torch.Tensor:
        return paged_decode(q, caches[i], tables, lens, scale, splits, out=res, pdl=pdl,
                            rope=(k, v, cos, sin, positions, slots))  # fmt: skip

    def layer(i: int, pdl: bool) -> torch.Tensor:
        torch.mm(x, weights[i], out=qkv)
        return attention(i, pdl)

    ref = layer(0, False).clone()
    out = dict(rows=rows, ctx=ctx, shape=[heads, kv_heads, dim], hidden=hidden, splits=splits,
               floor_us=round(floor_us, 2))  # fmt: skip
    gemm_us = _time(lambda i: torch.mm(x, weights[i], out=qkv), CALLS)
    results = [
        dict(out, part="Q/K/V alone", us=round(gemm_us, 2), equal=True),
        dict(out, part="attention alone", us=round(_time(lambda i: attention(i, False), CALLS), 2), equal=True),
    ]
    for pdl in (False, True):
        got = layer(0, pdl)
        equal = bool(torch.equal(got, ref))
        results.append(dict(out, part=f"Q/K/V + attention, pdl {int(pdl)}", equal=equal,
                            us=round(_time(lambda i, p=pdl: layer(i, p), CALLS), 2) if equal else None))  # fmt: skip
    return results


def after_gemm_table(results: list[dict], card: str) -> str:
    columns = ["shape (heads, KV heads, dim; hidden)", "rows", "context", "splits", "floor µs", "Q/K/V alone",
               "attention alone", "plain", "PDL", "all equal"]  # fmt: skip
    lines = _head(f"A layer's Q/K/V (cuBLAS) then its decode attention, µs per layer, {card}", columns)
    for _, group in itertools.groupby(results, key=lambda r: (tuple(r["shape"]), r["rows"], r["ctx"])):
        g = list(group)
        by = {r["part"]: r for r in g}
        first = g[0]
        cells = [by[p]["us"] for p in ("Q/K/V alone", "attention alone")]
        cells += [by[f"Q/K/V + attention, pdl {p}"]["us"] for p in (0, 1)]
        lines.append(f"| {first['shape']}; {first['hidden']} | {first['rows']} | {first['ctx']} | {first['splits']} "
                     f"| {first['floor_us']} | " + " | ".join(str(c) for c in cells)
                     + f" | {all(r['equal'] for r in g)} |")  # fmt: skip
    return "\n".join(lines)


# (name, decode rows, their contexts (low, high), prompt tokens): steps of W-share that start prompts
PREFILL_STEPS = [
    ("first fill: prompts only", 0, (0, 0), 8192),
    ("longest_first: 120 decode rows + ~5,500 prompt tokens", 120, (300, 2500), 5500),
    ("longest_first: 120 decode rows + ~1,100 prompt tokens", 120, (300, 2500), 1100),
    ("longest_first: 120 decode rows + ~200 prompt tokens", 120, (300, 2500), 200),
    ("defaults: 256 decode rows + ~8,000 prompt tokens", 256, (100, 1200), 8000),
]


def measure_prefill(
    name: str, decode_rows: int, ctx_range: tuple[int, int], prompt_tokens: int, heads=32, kv_heads=8, dim=128
) -> list[dict]:
    """One step: ``decode_rows`` rows of one token at contexts drawn from ``ctx_range``, then whole prompts of
    W-share's length law (lognormal, median 128, sigma 1, within [8, 2048]) up to ``prompt_tokens``."""
    g = torch.Generator().manual_seed(len(name))
    ctx = torch.randint(ctx_range[0], ctx_range[1] + 1, (decode_rows,), generator=g).tolist()
    new = [1] * decode_rows
    while True:
        n = int(min(2048, max(8, 128 * torch.randn(1, generator=g).exp().item())))
        if sum(new) - decode_rows + n > prompt_tokens:
            break
        ctx.append(n)
        new.append(n)
    rows, tokens = len(ctx), sum(new)
    nblocks = [-(-c // PAGE) for c in ctx]
    perm = torch.randperm(sum(nblocks), generator=g)
    tables = torch.zeros(rows, max(nblocks), dtype=torch.int32)
    at = 0
    for i, nb in enumerate(nblocks):
        tables[i, :nb] = perm[at : at + nb]
        at += nb
    caches = [torch.randn(2, sum(nblocks) + 1, PAGE, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
              for _ in range(2)]  # fmt: skip
    tables, lens = tables.cuda(), torch.tensor(ctx, device="cuda", dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    group, maxq = heads // kv_heads, max(new)
    block_map = prefill_block_map(starts, tokens, maxq, group)
    per = _prefill_block_m(maxq, group) // group
    nblk = -(-maxq // per)  # the launch before: every sequence gets max_query_len's worth of programs
    per_sequence = torch.stack(
        (torch.arange(rows, device="cuda").repeat_interleave(nblk), torch.arange(nblk, device="cuda").repeat(rows))
    ).to(torch.int32)
    scale = dim**-0.5
    results = []
    ref = None
    for launch, m in (("block map", block_map), ("per-sequence grid", per_sequence)):

        def fn(i, m=m):
            return paged_prefill(q, caches[i % 2], tables, lens, starts, maxq, scale, out=out, block_map=m)

        got = fn(0).clone()
        ref = got if ref is None else ref
        results.append(dict(step=name, launch=launch, rows=rows, tokens=tokens, max_query_len=maxq,
                            programs=m.shape[1] * kv_heads, us=round(_time(fn, CALLS), 2),
                            equal=bool(torch.equal(got, ref))))  # fmt: skip
    map_us = _time(lambda i: prefill_block_map(starts, tokens, maxq, group), CALLS)
    results.append(dict(step=name, launch="the map itself (once per step)", rows=rows, tokens=tokens,
                        max_query_len=maxq, programs=None, equal=True, us=round(map_us, 2)))  # fmt: skip
    return results


def _head(title: str, columns: list[str]) -> list[str]:
    """A markdown table's title line and header rows."""
    return [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def prefill_table(results: list[dict], card: str) -> str:
    lines = _head(
        f"Prefill kernel, one layer (llama-8b geometry), W-share-shaped steps, {card}",
        ["step", "rows", "tokens", "longest prompt", "block map µs (programs)", "per-sequence grid µs (programs)",
         "map µs", "equal"],
    )  # fmt: skip
    for name, group in itertools.groupby(results, key=lambda r: r["step"]):
        new, old, mk = list(group)
        lines.append(
            f"| {name} | {new['rows']} | {new['tokens']} | {new['max_query_len']} | {new['us']} ({new['programs']}) "
            f"| {old['us']} ({old['programs']}) | {mk['us']} | {new['equal'] and old['equal']} |"
        )
    return "\n".join(lines)


def _geometry(results: list[dict]) -> str:
    shapes = {tuple(r.get("shape", (32, 8, 128))) for r in results}
    return "; ".join(f"{h} query heads on {kv} KV heads of {d}" for h, kv, d in sorted(shapes))


def table(results: list[dict], card: str) -> str:
    lines = _head(
        f"Decode attention, one layer ({_geometry(results)}), {card}",
        ["rows", "context", "floor µs", "engine's choice µs (splits)", "best decode µs (splits, tile)", "best / floor",
         "prefill kernel µs", "all equal"],
    )  # fmt: skip
    for (rows, ctx), group in itertools.groupby(results, key=lambda r: (r["rows"], r["ctx"])):
        group = list(group)
        chosen = group[0]
        ran = [r for r in group if r["kernel"].startswith("decode") and r["equal"] and r["us"] is not None]
        best = min(ran, key=lambda r: r["us"]) if ran else dict(chosen, us=None)
        pre = next(r for r in group if r["kernel"].startswith("prefill"))
        ratio = f"{best['us'] / best['floor_us']:.2f}×" if best["us"] else "—"
        lines.append(
            f"| {rows} | {ctx} | {chosen['floor_us']} | {chosen['us']} ({chosen['splits']}) | {best['us']} "
            f"({best['splits']}, {best['tile'] or 'default'}) | {ratio} | {pre['us']} | "
            f"{all(r['equal'] for r in group if r['us'] is not None)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="32,128,256")
    ap.add_argument("--contexts", default="512,1500,4000")
    ap.add_argument("--max-model-len", type=int, default=8192, help="the engine's, which its split choice reads")
    ap.add_argument("--prefill", action="store_true", help="time the prefill kernel on W-share's prompt steps")
    ap.add_argument("--shape", default="32,8,128", help="query heads, KV heads, head_dim (default: llama-8b's)")
    ap.add_argument("--splits", default=",".join(map(str, SPLITS)), help="split counts of the grid")
    ap.add_argument(
        "--tiles",
        default=",".join("x".join(map(str, t)) for t in TILES),
        help="tiles of the grid, BLOCK_Nxwarpsxstages, comma-separated ('none': the engine's choice only)",
    )
    ap.add_argument(
        "--after-gemm",
        type=int,
        default=0,
        metavar="HIDDEN",
        help="time Q/K/V (HIDDEN inputs) then attention, with and without programmatic dependent launch",
    )
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    card, bandwidth = card_and_bandwidth(ap)
    if args.prefill:
        results = [r for step in PREFILL_STEPS for r in measure_prefill(*step)]
        write_json(args.json, card, bandwidth, results)
        print(prefill_table(results, card))
        return
    heads, kv_heads, dim = map(int, args.shape.split(","))
    tiles = [] if args.tiles == "none" else [tuple(map(int, t.split("x"))) for t in args.tiles.split(",")]
    splits = [int(x) for x in args.splits.split(",")]
    results = []
    for rows, ctx in itertools.product(map(int, args.rows.split(",")), map(int, args.contexts.split(","))):
        if args.after_gemm:
            results += measure_after_gemm(rows, ctx, bandwidth, args.max_model_len, heads, kv_heads, dim,
                                          args.after_gemm)  # fmt: skip
        else:
            results += measure(rows, ctx, bandwidth, args.max_model_len, heads, kv_heads, dim, splits, tiles)
        torch.cuda.empty_cache()
    write_json(args.json, card, bandwidth, results)
    print(after_gemm_table(results, card) if args.after_gemm else table(results, card))


if __name__ == "__main__":
    main()
