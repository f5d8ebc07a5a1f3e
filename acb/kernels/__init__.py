"""Triton kernels of the GPU fast path: paged attention (decode and prefill), rotary + KV-cache write, fused
residual + RMSNorm, and SiLU·mul.

Importing this package needs Triton (shipped with CUDA builds of torch). Nothing on the CPU path imports it; the
plain-torch reference in :mod:`acb.attention` is the oracle the tests hold these kernels to.
"""
