"""Triton kernels of the GPU fast path: paged attention (decode and prefill), rotary + KV-cache write, fused
residual + RMSNorm, SiLU·mul, and the decode GEMM.

The kernel modules need Triton (shipped with CUDA builds of torch); this package's own namespace does not, so the
CPU path can use the launch heuristics below. The plain-torch reference in :mod:`acb.attention` is the oracle the
tests hold these kernels to.
"""

from __future__ import annotations

import os

__all__ = ["decode_splits", "use_decode_gemm", "DECODE_GEMMS"]

DECODE_GEMMS = ("auto", "cublas", "triton")


def decode_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int = 132) -> int:
    """Context splits per sequence for :func:`acb.kernels.attention.paged_decode`: enough programs to fill the GPU
    twice, none shorter than 256 positions."""
    want = max(1, -(-2 * num_sms // max(1, batch * num_kv_heads)))
    return int(min(want, max(1, max_context // 256), 32))


def use_decode_gemm(device, tensor_parallel: bool) -> bool:
    """Whether the lean model's decode projections run :func:`acb.kernels.dense.linear` (Triton, with the step's
    small kernels under programmatic dependent launch) instead of cuBLAS. ``ACB_DECODE_GEMM`` in the environment:
    ``auto`` (default) takes it under tensor parallelism, where bench/chain.py measured it 5 % faster than cuBLAS
    (docs/benchmarks.md; no faster at one GPU's shapes); ``cublas`` never; ``triton`` wherever it can run. It needs
    a CUDA device of compute capability 9.0 or later (PDL) and a Triton that has it."""
    choice = os.environ.get("ACB_DECODE_GEMM", "auto")
    if choice not in DECODE_GEMMS:
        raise ValueError(f"ACB_DECODE_GEMM must be one of {DECODE_GEMMS}, got {choice!r}")
    if choice == "cublas" or device.type != "cuda" or (choice == "auto" and not tensor_parallel):
        return False
    import torch
    import triton.language as tl

    return torch.cuda.get_device_capability(device) >= (9, 0) and hasattr(tl.extra.cuda, "gdc_wait")
