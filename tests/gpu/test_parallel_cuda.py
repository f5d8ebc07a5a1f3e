"""Tensor parallelism on GPUs (NCCL, one GPU per rank): greedy equals one GPU's and model.generate (float32), both
overlap modes, with preemption and multi-step rounds, decode CUDA graphs on and off (the collectives captured in
them); a meta-device model gets random weights per rank; a killed worker fails the engine instead of hanging it
(the group is aborted); closing leaves no worker (skipped without two GPUs)."""

from __future__ import annotations

import asyncio
import copy
import os
import signal

import pytest
import torch
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, RequestFailedError, SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.parametrize(
    "overlap, steps, graphs", [(True, 1, True), (False, 4, True), (True, 4, True), (True, 1, False)]
)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_two_gpus_give_one_gpus_tokens(arch, overlap, steps, graphs, make_model, tokenizer):
    model, ref = make_model(arch, seed=5)
    prompts = random_prompts(8, [5, 17, 33, 3, 40, 12], len(tokenizer), seed=5)
    expected = [reference_greedy(ref, p, 16) for p in prompts]
    config = dict(device="cuda", block_size=16, num_kv_blocks=12, max_num_batched_tokens=64, overlap=overlap,
                  decode_steps=steps, cuda_graphs=graphs, max_num_seqs=16)  # fmt: skip

    async def run(m, world):
        async with Engine(m, tokenizer, EngineConfig(tensor_parallel_size=world, **config)) as engine:
            outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=16, ignore_eos=True))
                                          for p in prompts))  # fmt: skip
            workers = engine._runner.tp.alive() if world > 1 else []
            stats = engine.stats()
            assert (engine._runner.graphs is not None) == graphs
        return [o.token_ids for o in outs], workers, stats

    one, _, _ = await run(copy.deepcopy(model), 1)
    two, workers, stats = await run(model, 2)
    assert two == one == expected
    assert stats.num_preemptions > 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_meta_model_is_built_on_each_gpu(tokenizer):
    """No rank holds the whole model: a meta-device model's shards are made on each rank's GPU (random weights)."""
    from transformers import AutoModelForCausalLM

    from acb.default_model import tiny_config

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
    async with Engine(meta, tokenizer, EngineConfig(tensor_parallel_size=2, block_size=16, max_num_seqs=16)) as engine:
        assert engine._runner.device == torch.device("cuda", 0) and engine._runner.graphs is not None
        out = await engine.generate([5, 6, 7], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8


async def test_a_killed_worker_fails_the_engine_instead_of_hanging_it(make_model, tokenizer):
    model, _ = make_model("llama", seed=7)
    engine = Engine(
        model, tokenizer, EngineConfig(device="cuda", block_size=16, tensor_parallel_size=2, max_num_seqs=16)
    )
    async with engine:
        tasks = [asyncio.create_task(engine.generate([3 + i] * 9, SamplingParams(max_new_tokens=4000, ignore_eos=True)))
                 for i in range(4)]  # fmt: skip
        await asyncio.sleep(1.0)
        workers = engine._runner.tp.alive()
        os.kill(workers[0], signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        assert all(isinstance(r, RequestFailedError) for r in results), results
        assert engine.state == "failed"
