"""Triton kernels of the GPU fast path: paged attention (decode and prefill; the decode kernel also applies rotary
and per-head q/k norms and writes the new keys and values), rotary + KV-cache write, fused residual + RMSNorm, SiLU·mul,
the decode steps' gate/up projection with its activation, the decode graphs' greedy argmax and transformers'
rotate-half rotary for the generic path (:mod:`.attention`, :mod:`.fused`); a step's derived inputs
(:mod:`.step`); the decode steps' output and down projections on Hopper, a warp-specialised Gluon kernel whose split-K
partial sums the next norm adds up (:mod:`.projection`); the one-shot all-reduce of tensor parallelism
(:mod:`.one_shot`).

The kernel modules need Triton (shipped with CUDA builds of torch); this package's own namespace does not, so the
CPU path can use the launch heuristics below. The plain-torch reference in :mod:`acb.attention` is the oracle the
tests hold these kernels to.
"""

from __future__ import annotations

__all__ = ["decode_splits", "pdl_launch"]


def decode_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int = 132) -> int:
    """Context splits per sequence for :func:`acb.kernels.attention.paged_decode`: enough programs to fill the GPU
    twice, none shorter than one tile of 64 positions at ``max_context``, at most 32. The kernel sizes each split
    from the row's own length when it runs (whole tiles), so a shorter row leaves its last splits empty; a decode
    graph, which fixes the count for every row it will see, reads the engine's ``max_model_len`` here.

    The floor was 256 positions until session 21: it held models of one or two KV heads (Gemma 3 1B, Qwen2.5 1.5B)
    at 3 splits at 32 rows under a ``max_model_len`` of 784; with 9 and 5, their attention took 12 % and 5 % less GPU
    time per layer, about 3 % and 1 % of their decode steps (W-family, H200, docs/benchmarks.md, session 21)."""
    want = max(1, -(-2 * num_sms // max(1, batch * num_kv_heads)))
    return int(min(want, max(1, max_context // 64), 32))


def pdl_launch(on: bool) -> dict:
    """Triton's launch option for a kernel launched under programmatic dependent launch (Hopper and later): it may
    start before the kernel before it in the stream ends, and waits for it (``gdc_wait``) before it reads what that
    kernel writes. Empty when ``on`` is false: a plain launch."""
    return {"launch_pdl": True} if on else {}
