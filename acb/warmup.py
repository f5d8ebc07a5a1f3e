"""The warm-up: internal requests that ``start()`` runs before it returns (``EngineConfig.warmup``, on by default on
CUDA), so that the first real steps meet nothing for the first time.

What a fresh process meets for the first time is slow: Triton compiles a kernel variant (per tile size, per
alignment of its pointers), the caching allocator asks the driver for memory, cuBLAS loads the kernel it picks for a
GEMM shape (per row count: 3-5 ms each on an H200, up to ~70 ms with the device busy, with every thread waiting).

1. The lean path's GEMMs run at every row count an eager step can give them: its steps pad their tokens to a
   multiple of 16 (of 128 past 8,192 tokens: :func:`acb.lean_model.padded_tokens`), so that is every such count up
   to ``max_num_batched_tokens``, on every tensor-parallel rank (:meth:`acb.runner.ModelRunner.warm_gemms`).
2. Requests: first one step as large as the engine runs (``max_num_batched_tokens`` spread over as many prompts as
   that takes, within ``max_model_len``, half the KV cache and ``max_num_seqs``): its activations are the largest
   the allocator will be asked for, its GEMMs the tallest, and it decodes at that batch. Then a few short prompts
   together (the prefill kernel's small tile), one with a penalty (the penalty kernel). Afterwards the engine
   forgets them: the prefix cache drops their blocks, step timing and the counters of ``stats()`` restart.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .config import EngineConfig, SamplingParams

__all__ = ["plan", "run"]

log = logging.getLogger("acb")

Group = list[tuple[list[int], SamplingParams]]


def plan(config: EngineConfig, max_model_len: int, kv_tokens: int, vocab: int, group: int = 1) -> list[Group]:
    """The warm-up's groups of ``(prompt ids, params)``, each submitted together; empty when nothing fits (a prompt
    and its two tokens need more than ``max_model_len`` or half of the ``kv_tokens`` the cache holds). ``group``:
    query heads per KV head; the short prompts are short enough for the prefill kernel's small tile (at most 16
    rows of tokens times heads, :func:`acb.kernels.attention.paged_prefill`)."""
    budget = min(config.max_num_batched_tokens, kv_tokens // 2)
    per_prompt = min(max_model_len - 2, budget)
    if per_prompt < 1:
        return []
    lengths = [per_prompt] * max(1, budget // per_prompt)
    lengths = lengths[: config.max_num_seqs]
    if budget % per_prompt and len(lengths) < config.max_num_seqs and budget > per_prompt:
        lengths.append(budget % per_prompt)
    greedy = SamplingParams(max_new_tokens=2, ignore_eos=True)
    penalized = SamplingParams(max_new_tokens=2, ignore_eos=True, repetition_penalty=1.1)
    short = min(5, max(1, 16 // group), per_prompt)

    def ids(i: int, n: int, stride: int) -> list[int]:
        return [3 + (i * stride + j) % (vocab - 3) for j in range(n)]

    return [
        [(ids(i, n, 31), greedy) for i, n in enumerate(lengths)],
        [(ids(i, short, 7), penalized if i == 0 else greedy) for i in range(3)],
    ]


async def run(engine) -> None:
    """Warm the GEMMs' row counts, run the plan through ``engine``'s whole pipeline, then make the engine forget
    it. Each phase's duration goes to the log and to ``engine.startup``."""
    t0 = time.perf_counter()
    counts = await asyncio.wrap_future(engine._runner.warm_gemms())
    engine.startup["warmup_gemms_s"] = time.perf_counter() - t0
    log.info("acb warm-up, GEMMs at %d row counts: %.2f s", counts, engine.startup["warmup_gemms_s"])
    t0 = time.perf_counter()
    await _requests(engine)
    engine.startup["warmup_requests_s"] = time.perf_counter() - t0
    log.info("acb warm-up, requests: %.2f s", engine.startup["warmup_requests_s"])


async def _requests(engine) -> None:
    kv_tokens = (engine._blocks.num_blocks - 1) * engine.config.block_size
    shape = engine.shape
    group = shape.num_heads // shape.num_kv_heads
    groups = plan(engine.config, engine.max_model_len, kv_tokens, shape.vocab_size, group)
    if not groups:
        log.info("acb warm-up skipped: the KV cache or max_model_len is too small for a prompt and two tokens")
        return
    for g, group in enumerate(groups):
        streams = [await engine.submit(p, q, request_id=f"acb-warmup-{g}-{i}") for i, (p, q) in enumerate(group)]
        for stream in streams:
            await stream.collect()
    engine.clear_prefix_cache()
    engine.clear_step_timing()
    engine._reset_counters()
