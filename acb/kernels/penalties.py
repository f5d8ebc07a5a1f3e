"""The logits-processing pass in one kernel: repetition, frequency and presence penalties, ``logit_bias`` and
``min_tokens`` for the processed rows of a step, read from the per-slot tables of :class:`acb.logits.LogitsState`.

The torch version there makes about twenty passes over ``[rows, vocab]`` (gathers, temporaries, a scatter back);
this makes one, in place: each program reads a block of one row's logits and the same block of its slot's tables,
and writes the logits once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["apply_penalties"]


@triton.jit
def _penalties_kernel(
    LOGITS, INTS, FLOATS, COUNTS, PROMPT, BIAS, STOPPERS, OUT_LEN, P, V, s_logits,
    USE_REP: tl.constexpr, HAS_PROMPT: tl.constexpr, USE_COUNTS: tl.constexpr, USE_BIAS: tl.constexpr,
    USE_MIN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < V
    row = tl.load(INTS + p).to(tl.int64)
    slot = tl.load(INTS + P + p).to(tl.int64)
    ptr = LOGITS + row * s_logits + offs
    x = tl.load(ptr, mask=m, other=0.0)
    c = tl.load(COUNTS + slot * V + offs, mask=m, other=0)
    if USE_REP:
        penalty = tl.load(FLOATS + 2 * P + p)
        seen = c > 0
        if HAS_PROMPT:
            seen = seen | (tl.load(PROMPT + slot * V + offs, mask=m, other=0) != 0)
        x = tl.where(seen, tl.where(x > 0, x / penalty, x * penalty), x)
    if USE_COUNTS:
        presence = tl.load(FLOATS + p)
        frequency = tl.load(FLOATS + P + p)
        cf = c.to(tl.float32)
        x = x - frequency * cf - presence * (c > 0).to(tl.float32)
    if USE_BIAS:
        x = x + tl.load(BIAS + slot * V + offs, mask=m, other=0.0)
    if USE_MIN:
        short = tl.load(OUT_LEN + slot) < tl.load(INTS + 2 * P + p)
        stop = tl.load(STOPPERS + slot * V + offs, mask=m, other=0) != 0
        x = tl.where(stop & short, float("-inf"), x)
    tl.store(ptr, x, mask=m)


def apply_penalties(
    logits: torch.Tensor,
    ints: torch.Tensor,
    floats: torch.Tensor,
    counts: torch.Tensor,
    prompt: torch.Tensor | None,
    bias: torch.Tensor | None,
    stoppers: torch.Tensor | None,
    out_len: torch.Tensor,
    *,
    use_repetition: bool,
    use_counts: bool,
    use_bias: bool,
    use_min_tokens: bool,
) -> None:
    """In place on ``logits [S, V]`` (float32, unit stride along V) for the rows ``ints[0]`` of slots ``ints[1]``
    (``ints [3, P]``: rows, slots, min_tokens; ``floats [3, P]``: presence, frequency, repetition)."""
    p = ints.shape[1]
    vocab = logits.shape[1]
    block = 2048
    dummy = counts  # never read where its flag is off
    grid = (p, triton.cdiv(vocab, block))
    _penalties_kernel[grid](
        logits, ints, floats, counts,
        prompt.view(torch.uint8) if prompt is not None else dummy,
        bias if bias is not None else dummy,
        stoppers.view(torch.uint8) if stoppers is not None else dummy,
        out_len, p, vocab, logits.stride(0),
        USE_REP=use_repetition, HAS_PROMPT=prompt is not None, USE_COUNTS=use_counts, USE_BIAS=use_bias,
        USE_MIN=use_min_tokens, BLOCK=block,
    )  # fmt: skip
