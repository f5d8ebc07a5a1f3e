"""Weights asked into L2 ahead of the kernel that reads them.

A decode step's small projections are latency-bound, not bandwidth-bound: gemma3-1b's Q/K/V (3.5 MB) takes 4.6 µs
on an H200 where its bytes need 0.8 (docs/benchmarks.md). Spread over 132 SMs, each SM's share of such a weight is
less than what it must keep in flight to cover one DRAM round trip, so the GEMM waits on memory latency from start
to end while the card's bandwidth sits mostly idle. The kernel launched just before it (a norm, attention) can ask
L2 for those bytes: a prefetch is a hint that returns at once, the lines arrive while that kernel runs, and the GEMM
then reads them from L2.

:func:`prefetch_l2` is the device-side helper a kernel calls at its start; each program asks for its share of one
byte range. ``MODE`` 1 asks per 128-byte line (``prefetch.global.L2``), 2 per chunk of bytes
(``cp.async.bulk.prefetch.L2``, Hopper's bulk copy engine: one instruction per chunk). Triton's interpreter (the
CPU tests) has no inline assembly, so kernels there run with mode 0, which compiles the prefetch out.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["prefetch_l2", "region", "mode", "MODES"]

MODES = {"off": 0, "lines": 1, "bulk": 2}
LINE = 128  # bytes per L2 line request in mode 1
CHUNK = 16384  # bytes per bulk request in mode 2
# the mode every kernel that prefetches runs with (bench.prefetch and the A/B runs set it: ACB_L2_PREFETCH)
MODE = MODES[os.environ.get("ACB_L2_PREFETCH", "off")]
# which weights the lean model asks for, each from the kernel before the one that reads it: "qkv" (from the first
# norm), "o" (from attention), "gate_up" (from the second norm), "down" (from gate/up)
TARGETS = frozenset(os.environ.get("ACB_L2_PREFETCH_AT", "qkv,o,gate_up,down").split(","))


@triton.jit
def _line(ptrs):
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _bulk(ptrs, nbytes):
    return tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
        "=r,l,r",
        [ptrs, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def prefetch_l2(PF, nbytes, pid, nprog, MODE: tl.constexpr, LANES: tl.constexpr):
    """Program ``pid`` of ``nprog`` asks L2 for its share of bytes ``[0, nbytes)`` at ``PF`` (any pointer type;
    ``nbytes`` a multiple of 16, the range 16-byte aligned), LANES requests at a time, and returns at once."""
    if MODE != 0:
        base = PF.to(tl.pointer_type(tl.int8))
        if MODE == 1:
            size = 128  # LINE
        else:
            size = 16384  # CHUNK
        pieces = tl.cdiv(nbytes, size)
        for p0 in range(pid * LANES, pieces, nprog * LANES):
            p = p0 + tl.arange(0, LANES)
            live = p < pieces
            off = tl.where(live, p, 0).to(tl.int64) * size
            if MODE == 1:
                _line(base + off)
            else:
                n = tl.where(live, tl.minimum(nbytes - off, size), 16).to(tl.int32)
                _bulk(base + off, n)


def mode(device: torch.device) -> int:
    """The prefetch mode kernels on ``device`` run with: :data:`MODE` on a CUDA card of compute capability 9.0 or
    later (the bulk prefetch is Hopper's), 0 elsewhere and under Triton's interpreter."""
    if MODE == 0 or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    return MODE if _capability(device) >= 9 else 0


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def region(weight: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``(tensor, bytes)`` for a kernel's prefetch arguments: the whole of a contiguous ``weight`` (rounded down to
    16 bytes), or ``(None-stand-in, 0)``; the caller passes its own tensor as the stand-in pointer."""
    if weight is None:
        return None, 0
    if not weight.is_contiguous() or weight.data_ptr() % 16:
        raise ValueError("prefetch_l2 takes a contiguous, 16-byte aligned tensor")
    return weight, weight.numel() * weight.element_size() // 16 * 16
