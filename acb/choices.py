"""Several samples of one prompt (``SamplingParams.n`` and ``best_of``): one request per sample, sharing the
prompt's KV blocks.

The prompt is tokenized once. Sample 0 is queued first; the others wait in the queue until it has computed the
prompt (its first token exists), then start from the prefix cache, which holds every full block of the prompt by
then: n samples of a long prompt compute it about once. Without prefix caching, or for a prompt shorter than a
block (nothing to share), they start together. Each sample gets its own seed: ``seed + i`` when the request gives
one (reproducible whatever else runs), else a random one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import anyio

from .config import SamplingParams
from .errors import InvalidSamplingParamsError
from .outputs import Completion

if TYPE_CHECKING:
    from .admission import Prompt
    from .engine import Engine
    from .stream import RequestStream

__all__ = ["submit_choices", "generate_choices"]


async def submit_choices(
    engine: Engine, prompt: Prompt, params: SamplingParams, request_id: str, stream_interval: int = 1
) -> list[RequestStream]:
    """``params.n`` streams, ids ``{request_id}-{i}``, all admitted (typed errors here) before any is returned."""
    if params.best_of is not None and params.best_of > params.n:
        raise InvalidSamplingParamsError(
            "best_of ranks whole outputs, so it cannot stream: use engine.generate_choices()", param="best_of"
        )
    return await _submit(engine, prompt, params, params.n, request_id, stream_interval, logprobs=params.logprobs)


async def generate_choices(engine: Engine, prompt: Prompt, params: SamplingParams, request_id: str) -> list[Completion]:
    """``params.n`` completions; with ``best_of``, the ``n`` of ``best_of`` samples with the highest cumulative
    log-probability, best first."""
    count = params.best_of or params.n
    ranked = count > params.n
    streams = await _submit(engine, prompt, params, count, request_id, 1, logprobs=params.logprobs or ranked)
    results: list[Completion | None] = [None] * count

    async def collect(i: int) -> None:
        results[i] = await streams[i].collect()

    try:
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(collect, i)
    finally:
        for s in streams:  # a failure or cancellation ends every sample
            await s.aclose()
    if not ranked:
        return results
    best = sorted(results, key=lambda c: c.cumulative_logprob, reverse=True)[: params.n]
    if not params.logprobs:
        best = [dataclasses.replace(c, logprobs=None) for c in best]
    return best


async def _submit(
    engine: Engine, prompt: Prompt, params: SamplingParams, count: int, request_id: str, interval: int, logprobs: bool
) -> list[RequestStream]:
    ids = await engine._admission.tokenize(prompt)  # once for all samples
    one = dataclasses.replace(params, n=1, best_of=None, logprobs=logprobs)
    streams: list[RequestStream] = []
    try:
        for i in range(count):
            p = one if one.seed is None else dataclasses.replace(one, seed=(one.seed + i) % (1 << 32))
            rid = f"{request_id}-{i}"
            if i and engine.config.prefix_caching and len(ids) > engine.config.block_size:  # a full block to share
                engine._follows[rid] = streams[0]._state.seq
            try:
                streams.append(await engine.submit(ids, p, request_id=rid, stream_interval=interval))
            finally:
                engine._follows.pop(rid, None)
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return streams
