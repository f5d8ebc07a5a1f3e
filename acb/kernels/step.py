"""A step's derived inputs in one kernel: what :meth:`acb.step_inputs.StepInputs.derive` computes from the staged
fields before the model runs (each token's input id and KV-cache slot, each row's block table).

torch spends ten small kernels on it (four gathers, a cast, a select, a division, a remainder, a product and a sum),
inside every decode graph: ~20 µs of a 1B model's 1.3 ms step on an H200, and a gap between graph nodes per kernel
(docs/benchmarks.md, session 23). The torch version stays in ``step_inputs`` for the CPU and as this kernel's
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["step_indices"]


@triton.jit
def _step_indices_kernel(
    HOST_IDS, FROM_DEV, TOKEN_ROWS, POS, SLOTS, TOKEN_BUF, TABLES, IDS, SLOT_MAP, BT,
    t, max_blocks, s_tables, TOKEN_PROGRAMS,
    BS: tl.constexpr, BLOCK: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """Programs ``0 .. TOKEN_PROGRAMS`` take ``BLOCK`` tokens each; program ``TOKEN_PROGRAMS + r`` copies row
    ``r``'s block table."""
    p = tl.program_id(0)
    if p < TOKEN_PROGRAMS:
        i = p * BLOCK + tl.arange(0, BLOCK)
        m = i < t
        slot = tl.load(SLOTS + tl.load(TOKEN_ROWS + i, mask=m, other=0), mask=m, other=0)
        pos = tl.load(POS + i, mask=m, other=0)
        dev = tl.load(FROM_DEV + i, mask=m, other=0) != 0
        prev = tl.load(TOKEN_BUF + slot, mask=m & dev, other=0)
        tl.store(IDS + i, tl.where(dev, prev, tl.load(HOST_IDS + i, mask=m, other=0)), mask=m)
        block = tl.load(TABLES + slot * s_tables + pos // BS, mask=m, other=0)
        tl.store(SLOT_MAP + i, block * BS + pos % BS, mask=m)
    else:
        r = p - TOKEN_PROGRAMS
        src = TABLES + tl.load(SLOTS + r) * s_tables
        dst = BT + r.to(tl.int64) * max_blocks
        for c in range(0, max_blocks, COLS):
            cols = c + tl.arange(0, COLS)
            tl.store(dst + cols, tl.load(src + cols, mask=cols < max_blocks), mask=cols < max_blocks)


_BLOCK = 256
_COLS = 256


def step_indices(
    host_ids: torch.Tensor,
    from_device: torch.Tensor,
    token_rows: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    token_buf: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [T], slot_mapping [T], block_tables [B, max_blocks])``, all int64, of a step of ``T`` tokens
    (``host_ids``, ``from_device``, ``token_rows``, ``positions``) and ``B`` rows (``slots``): a token's input id is
    its row's previous sample (``token_buf`` at the row's slot) where ``from_device`` is set, else the host's; its
    cache slot is its position's entry in its row's block table. Every index tensor is int64 and contiguous."""
    t, n = len(positions), len(slots)
    max_blocks = tables.shape[1]
    ids = torch.empty(t, dtype=torch.int64, device=positions.device)
    slot_mapping = torch.empty(t, dtype=torch.int64, device=positions.device)
    block_tables = torch.empty(n, max_blocks, dtype=torch.int64, device=positions.device)
    token_programs = triton.cdiv(t, _BLOCK)
    if token_programs + n:
        _step_indices_kernel[(token_programs + n,)](
            host_ids, from_device, token_rows, positions, slots, token_buf, tables, ids, slot_mapping, block_tables,
            t, max_blocks, tables.stride(0), token_programs, BS=block_size, BLOCK=_BLOCK, COLS=_COLS, num_warps=4,
        )  # fmt: skip
    return ids, slot_mapping, block_tables
