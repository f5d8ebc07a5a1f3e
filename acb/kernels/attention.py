"""Paged attention in Triton.

- :func:`paged_decode`: one query token per sequence, flash-decoding style. Programs split each context into
  ``num_splits`` chunks (more parallelism when batches are small and contexts long); each program serves all the
  query heads of one KV head (grouped-query attention without repeating K/V), then a second kernel merges the
  splits' partial softmax states (with one split, which large batches get, the program writes the output itself and
  no second kernel runs). Sequence lengths are read on the device, so the launch is CUDA-graph safe. Given the
  step's new keys and values (``rope=``), it also applies rotary embedding and writes them to the cache, which the
  lean path's decode steps use instead of a separate :func:`acb.kernels.fused.rope_and_cache` launch per layer.
- :func:`paged_prefill`: any number of query tokens per sequence (chunked prefill and mixed steps), causal over the
  sequence's cached context; a program also serves all the query heads of one KV head, stacked in its tile.

Both read K/V through block tables from the cache layout of :class:`acb.kv_cache.KVCache`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import decode_splits, pdl_launch

__all__ = ["paged_decode", "paged_prefill", "prefill_block_map", "decode_splits"]


@triton.jit
def _kv_offsets(BT, b, s_bt, pos, nmask, kvh, s_kb, s_ks, s_kh, PAGE: tl.constexpr):
    """Cache offsets of positions ``pos`` of sequence ``b`` (KV head ``kvh``), through its block table."""
    page = tl.load(BT + b * s_bt + pos // PAGE, mask=nmask, other=0)
    return page.to(tl.int64) * s_kb + (pos % PAGE) * s_ks + kvh * s_kh


@triton.jit
def _online_softmax(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold one tile of scores ``s`` (masked entries -inf) and values ``v`` into the running softmax state."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, KC, VC, BT, LENS, OP, MP, LP, OUT, scale, KN, VN, COS, SIN, POS, SLOT, QW, KW, eps,
    s_qb, s_qh, s_kb, s_ks, s_kh, s_bt, s_ob, s_oh, s_os, s_mb, s_mh, s_b, s_h, s_knb, s_knh, s_vnb, s_vnh, s_cos,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, SPLITS: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, ROPE: tl.constexpr,
    QK_NORM: tl.constexpr, NEW_KV: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # PDL (launched under programmatic dependent launch, Hopper; acb.kernels.pdl_choice's level): wait for the kernel
    # before first thing; at level 1 let the merge kernel launch once this program's state is stored, from level 2
    # right after the wait. (Reading the lengths and block tables and asking L2 for the chunk's keys and values
    # before the wait was slower: the Q/K/V GEMM before it, cuBLAS, lets the kernel launch only as its own programs
    # end, so that work did not overlap it; docs/benchmarks.md, session 29.)
    # NEW_KV: KN/VN hold the new token's key and value, not yet in the cache: the program whose chunk holds the new
    # position writes them to the cache slot SLOT[b], before its own loop reads them. ROPE (with NEW_KV): Q and KN
    # come before rotary embedding; every program rotates its query heads in registers, and the key is rotated
    # before it is written.
    # QK_NORM (with ROPE): Q and KN come before their per-head RMSNorms too (weights QW, KW), which are applied
    # first, with the arithmetic of acb.kernels.fused.add_rmsnorm (each head's row of D values, rounded once).
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL >= 2:  # (level 2: the merge, or O, may launch now, onto the SMs this kernel leaves free)
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(LENS + b)
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    if WINDOW > 0:
        start = tl.maximum(start, ctx - WINDOW)
    end = tl.minimum(split * chunk + chunk, ctx)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)  # head_dim padded to a power of two (Phi-3's 96); padding columns read as zeros
    dmask = d[None, :] < D
    heads = kvh * GROUP + g
    gmask = g < GROUP
    qmask = gmask[:, None] & dmask
    if ROPE:
        # rotate-half rotary, the same arithmetic as acb.kernels.fused.rope_and_cache (fp32, rounded once)
        HALF: tl.constexpr = D // 2
        first = d < HALF
        partner = tl.where(first, d + HALF, d - HALF)  # the column each one is rotated with
        angle = tl.load(POS + b) * s_cos + tl.where(first, d, d - HALF)
        c = tl.load(COS + angle, mask=d < D, other=0.0)
        sn = tl.load(SIN + angle, mask=d < D, other=0.0)
        q_row = Q + b * s_qb + heads[:, None] * s_qh
        qa = tl.load(q_row + d[None, :], mask=qmask, other=0.0).to(tl.float32)
        qb = tl.load(q_row + partner[None, :], mask=qmask, other=0.0).to(tl.float32)
        if QK_NORM:
            rq = tl.rsqrt(tl.sum(qa * qa, 1) / D + eps)[:, None]
            qwa = tl.load(QW + d, mask=d < D, other=0.0)[None, :]
            qwb = tl.load(QW + partner, mask=d < D, other=0.0)[None, :]
            qa = ((qa * rq).to(QW.dtype.element_ty) * qwa).to(Q.dtype.element_ty).to(tl.float32)
            qb = ((qb * rq).to(QW.dtype.element_ty) * qwb).to(Q.dtype.element_ty).to(tl.float32)
        c2, s2 = c[None, :], sn[None, :]
        q = tl.where(first[None, :], qa * c2 - qb * s2, qa * c2 + qb * s2).to(Q.dtype.element_ty)
    else:
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=qmask, other=0.0)
    last = ctx - 1
    if NEW_KV and (split * chunk <= last) & (last < split * chunk + chunk):
        kn_row = KN + b * s_knb + kvh * s_knh
        ka = tl.load(kn_row + d, mask=d < D, other=0.0).to(tl.float32)
        if ROPE:
            kb = tl.load(kn_row + partner, mask=d < D, other=0.0).to(tl.float32)
            if QK_NORM:  # (names of their own: Triton types a name once per scope)
                rk = tl.rsqrt(tl.sum(ka * ka, 0) / D + eps)
                kwa = tl.load(KW + d, mask=d < D, other=0.0)
                kwb = tl.load(KW + partner, mask=d < D, other=0.0)
                ka = ((ka * rk).to(KW.dtype.element_ty) * kwa).to(KN.dtype.element_ty).to(tl.float32)
                kb = ((kb * rk).to(KW.dtype.element_ty) * kwb).to(KN.dtype.element_ty).to(tl.float32)
            ka = tl.where(first, ka * c - kb * sn, ka * c + kb * sn)
        slot = tl.load(SLOT + b).to(tl.int64)
        cache = (slot // PAGE) * s_kb + (slot % PAGE) * s_ks + kvh * s_kh + d
        tl.store(KC + cache, ka.to(KC.dtype.element_ty), mask=d < D)
        v_new = tl.load(VN + b * s_vnb + kvh * s_vnh + d, mask=d < D, other=0.0)
        tl.store(VC + cache, v_new.to(VC.dtype.element_ty), mask=d < D)
        tl.debug_barrier()  # the block's writes are visible to its own loads below
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < end
        off = _kv_offsets(BT, b, s_bt, pos, nmask, kvh, s_kb, s_ks, s_kh, PAGE)
        k = tl.load(KC + off[:, None] + d[None, :], mask=nmask[:, None] & dmask, other=0.0)
        v = tl.load(VC + off[:, None] + d[None, :], mask=nmask[:, None] & dmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, PRECISION)
    if SPLITS == 1:  # the whole context in this program: the output itself, no merge kernel
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptr = OUT + b * s_b + heads[:, None] * s_h + d[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=qmask)
    else:
        o_ptr = OP + b * s_ob + heads[:, None] * s_oh + split * s_os + d[None, :]
        tl.store(o_ptr, acc, mask=qmask)
        tl.store(MP + b * s_mb + heads * s_mh + split, m_i, mask=gmask)
        tl.store(LP + b * s_mb + heads * s_mh + split, l_i, mask=gmask)
    if PDL == 1:  # the merge may launch once every split has stored its state (it waits for them all anyway)
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _decode_merge_kernel(
    OP, MP, LP, OUT, s_ob, s_oh, s_os, s_mb, s_mh, s_b, s_h,
    SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL >= 2:
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    smask = s < SPLITS
    d = tl.arange(0, D_PAD)
    m = tl.load(MP + b * s_mb + h * s_mh + s, mask=smask, other=float("-inf"))
    lsum = tl.load(LP + b * s_mb + h * s_mh + s, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    denom = tl.sum(lsum * w, 0)
    acc = tl.load(OP + b * s_ob + h * s_oh + s[:, None] * s_os + d[None, :], mask=smask[:, None] & (d[None, :] < D),
                  other=0.0)  # fmt: skip
    out = tl.sum(acc * w[:, None], 0) / denom
    tl.store(OUT + b * s_b + h * s_h + d, out.to(OUT.dtype.element_ty), mask=d < D)


def _block_n(q: torch.Tensor) -> int:
    """Keys per tile: 64, or 32 where rows are wider than 512 bytes (head_dim 256 in float32), so that two stages of
    key and value tiles stay within an SM's shared memory (227 KB on H100)."""
    return 64 if triton.next_power_of_2(q.shape[-1]) * q.element_size() <= 512 else 32


def _decode_tile(q: torch.Tensor) -> tuple[int, int, int]:
    """The split kernel's ``(BLOCK_N, num_warps, num_stages)``: three stages of key and value tiles in flight where
    they take at most 96 KB of shared memory (bf16 at head_dim ≤ 128), two otherwise. Measured with bench.attention
    (docs/benchmarks.md): three stages took 2-10 % off two at 64-256 rows of 512-4,000 positions on an H200, and
    tie on an H100."""
    block_n = _block_n(q)
    stage_bytes = 2 * block_n * triton.next_power_of_2(q.shape[-1]) * q.element_size()
    return block_n, 4, 3 if 3 * stage_bytes <= 96 * 1024 else 2


def paged_decode(
    q: torch.Tensor,  # [B, H, D]
    kv: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: torch.Tensor,  # [B] int, on the device
    scale: float,
    splits: int,
    out: torch.Tensor | None = None,
    window: int = 0,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tile: tuple[int, int, int] | None = None,
    rope: tuple[torch.Tensor, ...] | None = None,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    pdl: int = 0,
) -> torch.Tensor:
    """``tile``: ``(BLOCK_N, num_warps, num_stages)`` of the split kernel instead of the defaults (bench.attention
    times the choices).

    ``rope``: ``(k, v, cos, sin, positions, slot_mapping)`` of the step's new tokens, as
    :func:`acb.kernels.fused.rope_and_cache` takes them, with ``q`` before rotary: the kernel rotates q (in registers;
    ``q`` itself is left as it is) and k, and writes k and v to the cache, one kernel instead of two per layer.

    ``qk_norm``: ``(q weight, k weight, eps)`` of per-head RMSNorms (Qwen3, Gemma 3) that ``q`` and the new key
    (``rope``'s ``k``, which it needs) have not had yet: the kernel applies them before rotary, in registers, where
    :func:`acb.kernels.fused.add_rmsnorm` on each would take two kernels and a copy of the strided q.

    ``new_kv``: ``(k, v, slot_mapping)`` of the step's new tokens, already rotated (the generic path's): the kernel
    writes them to the cache, one kernel where :meth:`acb.kv_cache.KVCache.write` takes two to four.

    ``pdl`` (CUDA, compute capability 9.0 or later; a level of :func:`acb.kernels.pdl_choice`): both kernels launch
    under programmatic dependent launch, so that each launch overlaps the end of the kernel before it; each waits
    for that kernel first thing. At level 1 the split kernel lets the merge launch once its states are stored; from
    level 2 each lets the next kernel launch right after its wait.
    """
    if qk_norm is not None and rope is None:
        raise ValueError("qk_norm comes with rope: the kernel norms the new key it writes to the cache")
    if rope is not None and new_kv is not None:
        raise ValueError("rope or new_kv, not both: rope's keys and values are the new ones")
    bsz, heads, dim = q.shape
    kvh = kv.shape[3]
    group = heads // kvh
    out = torch.empty_like(q) if out is None else out
    if splits == 1:  # no partial states: the kernel writes ``out`` (which also stands in for the unused pointers)
        op = mp = lp = out
    elif workspace is None:
        op = torch.empty(bsz, heads, splits, dim, dtype=torch.float32, device=q.device)
        mp = torch.empty(bsz, heads, splits, dtype=torch.float32, device=q.device)
        lp = torch.empty_like(mp)
    else:
        op, mp, lp = (w[:bsz] for w in workspace)
    kc, vc = kv[0], kv[1]
    block_n, warps, stages = tile or _decode_tile(q)
    if rope is not None:
        kn, vn, cos, sin, positions, slots = rope
    elif new_kv is not None:
        (kn, vn, slots), cos, sin, positions = new_kv, q, q, seq_lens
    else:
        kn, vn, cos, sin, positions, slots = q, q, q, q, seq_lens, seq_lens
    if kn.stride(-1) != 1 or vn.stride(-1) != 1:
        kn, vn = kn.contiguous(), vn.contiguous()
    qw, kw, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    launch = pdl_launch(pdl)
    _decode_split_kernel[(bsz, kvh, splits)](
        q, kc, vc, block_tables, seq_lens, op, mp, lp, out, scale, kn, vn, cos, sin, positions, slots, qw, kw, eps,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        op.stride(0), op.stride(1), op.stride(2), mp.stride(0), mp.stride(1), out.stride(0), out.stride(1),
        kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), cos.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, D_PAD=triton.next_power_of_2(dim),
        BLOCK_N=block_n, PAGE=kv.shape[2],
        SPLITS=splits, WINDOW=window, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", ROPE=rope is not None,
        QK_NORM=qk_norm is not None, NEW_KV=rope is not None or new_kv is not None, PDL=pdl, num_warps=warps,
        num_stages=stages, **launch,
    )  # fmt: skip
    if splits == 1:  # the split kernel wrote the output
        return out
    _decode_merge_kernel[(bsz, heads)](
        op, mp, lp, out, op.stride(0), op.stride(1), op.stride(2), mp.stride(0), mp.stride(1),
        out.stride(0), out.stride(1), SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), D=dim,
        D_PAD=triton.next_power_of_2(dim), PDL=pdl, num_warps=2, **launch,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["NSEQ", "s_map"])
def _prefill_kernel(
    Q, KC, VC, BT, LENS, QSTART, OUT, MAP, scale, NSEQ,
    s_qt, s_qh, s_kb, s_ks, s_kh, s_bt, s_ot, s_oh, s_map,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M // GROUP query tokens of sequence b, with all GROUP query heads of KV head kvh stacked as
    # the tile's rows (row r: token r // GROUP, head r % GROUP), so that each key/value tile is read once per KV head
    # rather than once per query head. A decode row of a mixed step (one token) fills GROUP rows of the tile. Axis 0
    # numbers the step's (sequence, block of tokens) pairs, as MAP lists them (prefill_block_map): one program per
    # block that holds tokens, not max_query_len's worth per sequence; the grid's spare programs find b = NSEQ.
    b = tl.load(MAP + tl.program_id(0))
    if b >= NSEQ:
        return
    mblk = tl.load(MAP + s_map + tl.program_id(0))
    kvh = tl.program_id(1)
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    q0 = tl.load(QSTART + b)
    n_q = tl.load(QSTART + b + 1) - q0
    t0 = mblk * TOKENS
    if t0 >= n_q:  # a map may list more blocks than a sequence has (bench.attention's per-sequence grid)
        return
    ctx = tl.load(LENS + b)
    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // GROUP
    head = kvh * GROUP + r % GROUP
    mmask = (r < TOKENS * GROUP) & (tok < n_q)
    q_pos = ctx - n_q + tok
    d = tl.arange(0, D_PAD)
    dmask = d[None, :] < D
    q_off = (q0 + tok)[:, None] * s_qt + head[:, None] * s_qh + d[None, :]
    q = tl.load(Q + q_off, mask=mmask[:, None] & dmask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    hi = tl.minimum(ctx, ctx - n_q + t0 + TOKENS)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(0, (ctx - n_q + t0 - WINDOW + 1) // BLOCK_N * BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < hi
        off = _kv_offsets(BT, b, s_bt, pos, nmask, kvh, s_kb, s_ks, s_kh, PAGE)
        k = tl.load(KC + off[:, None] + d[None, :], mask=nmask[:, None] & dmask, other=0.0)
        v = tl.load(VC + off[:, None] + d[None, :], mask=nmask[:, None] & dmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        keep = nmask[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            keep = keep & (pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = OUT + (q0 + tok)[:, None] * s_ot + head[:, None] * s_oh + d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=mmask[:, None] & dmask)


def _prefill_block_m(max_query_len: int, group: int) -> int:
    """Rows of the prefill kernel's tile: 64 (16 when every sequence has at most a few tokens: decode-like steps),
    never fewer rows than one token's query heads; a group that does not divide the tile leaves its last rows unused."""
    return max(64 if max_query_len * group > 16 else 16, triton.next_power_of_2(group))


def prefill_block_map(query_start_loc: torch.Tensor, tokens: int, max_query_len: int, group: int) -> torch.Tensor:
    """The prefill kernel's programs for one step: ``[2, n]`` int32, row 0 each program's sequence, row 1 its block
    of ``BLOCK_M // group`` query tokens in that sequence; ``n`` (a multiple of 4, so that both rows start 16-byte
    aligned and Triton compiles one variant) bounds the step's blocks from its ``tokens``, and the spare programs
    get the sequence count. Computed on the device (no sync); one step's layers share it."""
    per = _prefill_block_m(max_query_len, group) // group
    n_q = query_start_loc[1:] - query_start_loc[:-1]
    blocks = (n_q + per - 1) // per
    ends = torch.cumsum(blocks, 0)
    n = -(-(-(-tokens // per) + n_q.shape[0]) // 4) * 4
    pid = torch.arange(n, device=ends.device, dtype=ends.dtype)
    seq = torch.searchsorted(ends, pid, right=True)
    mblk = pid - (ends - blocks)[seq.clamp(max=n_q.shape[0] - 1)]
    return torch.stack((seq, mblk)).to(torch.int32)


def paged_prefill(
    q: torch.Tensor,  # [T, H, D] packed
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,  # [B] device
    query_start_loc: torch.Tensor,  # [B + 1] device
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    window: int = 0,
    block_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """``block_map``: :func:`prefill_block_map` of this step (computed here if None; a model computes it once per
    step for all its layers)."""
    _, heads, dim = q.shape
    kvh = kv.shape[3]
    group = heads // kvh
    out = torch.empty_like(q) if out is None else out
    block_m = _prefill_block_m(max_query_len, group)
    if block_map is None:
        block_map = prefill_block_map(query_start_loc, q.shape[0], max_query_len, group)
    kc, vc = kv[0], kv[1]
    block_n = _block_n(q)
    _prefill_kernel[(block_map.shape[1], kvh)](
        q, kc, vc, block_tables, seq_lens, query_start_loc, out, block_map, scale, seq_lens.shape[0],
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), block_map.stride(0),
        GROUP=group, D=dim, D_PAD=triton.next_power_of_2(dim), BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=kv.shape[2], WINDOW=window,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
