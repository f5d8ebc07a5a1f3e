"""Tensor parallelism on GPUs (NCCL, one GPU per rank): greedy equals one GPU's and model.generate (float32), both
overlap modes, with preemption and multi-step rounds; closing leaves no worker (skipped without two GPUs)."""

from __future__ import annotations

import asyncio
import copy
import os

import pytest
import torch
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.parametrize("overlap, steps", [(True, 1), (False, 4), (True, 4)])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_two_gpus_give_one_gpus_tokens(arch, overlap, steps, make_model, tokenizer):
    model, ref = make_model(arch, seed=5)
    prompts = random_prompts(8, [5, 17, 33, 3, 40, 12], len(tokenizer), seed=5)
    expected = [reference_greedy(ref, p, 16) for p in prompts]
    config = dict(device="cuda", block_size=16, num_kv_blocks=12, max_num_batched_tokens=64, overlap=overlap,
                  decode_steps=steps)  # fmt: skip

    async def run(m, world):
        async with Engine(m, tokenizer, EngineConfig(tensor_parallel_size=world, **config)) as engine:
            outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=16, ignore_eos=True))
                                          for p in prompts))  # fmt: skip
            workers = engine._runner.tp.alive() if world > 1 else []
            stats = engine.stats()
        return [o.token_ids for o in outs], workers, stats

    one, _, _ = await run(copy.deepcopy(model), 1)
    two, workers, stats = await run(model, 2)
    assert two == one == expected
    assert stats.num_preemptions > 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
