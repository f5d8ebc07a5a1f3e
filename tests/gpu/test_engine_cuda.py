"""The engine on CUDA: greedy output equals model.generate in float32, in both overlap modes (skipped without CUDA)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


PATHS = {
    "graphs": dict(fast_path=True, cuda_graphs=True),
    "lean-eager": dict(fast_path=True, cuda_graphs=False),
    "generic": dict(fast_path=False),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
async def test_greedy_matches_generate_on_cuda(arch, overlap, path, make_model, tokenizer):
    model, ref = make_model(arch, seed=2)
    prompts = random_prompts(10, [5, 17, 33, 64, 3, 100], len(tokenizer), seed=4)
    expected = [reference_greedy(ref, p, 24) for p in prompts]
    config = EngineConfig(
        device="cuda", max_num_batched_tokens=64, block_size=16, num_kv_blocks=30, overlap=overlap, **PATHS[path]
    )
    async with Engine(model, tokenizer, config) as engine:

        async def one(i, p):
            await asyncio.sleep(0.003 * (i % 4))
            return await engine.generate(p, SamplingParams(max_new_tokens=24, ignore_eos=True))

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        stats = engine.stats()
        assert engine.fast_path == (path != "generic")
        assert (engine._runner.graphs is not None) == (path == "graphs")
    assert [o.token_ids for o in outs] == expected
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


async def test_seeded_sampling_on_cuda_is_batch_independent(make_model, tokenizer):
    model, _ = make_model("llama", seed=3)
    prompts = random_prompts(9, [7, 30, 64], len(tokenizer), seed=5)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    async with Engine(model, tokenizer, EngineConfig(device="cuda", block_size=16)) as engine:
        alone = await engine.generate(prompts[0], params)
        crowd = await asyncio.gather(
            *(
                engine.generate(p, params if i == 0 else SamplingParams(max_new_tokens=30))
                for i, p in enumerate(prompts)
            )
        )
    assert crowd[0].token_ids == alone.token_ids


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_greedy_rows_match_generate_beside_sampled_and_logprob_rows(overlap, make_model, tokenizer):
    """Decode graphs sample all-greedy steps inside the graph and other steps outside it: greedy requests get the
    same tokens either way, also while the batch turns from mixed to all-greedy as the sampled requests end."""
    model, ref = make_model("llama", seed=6)
    prompts = random_prompts(9, [9, 40, 21], len(tokenizer), seed=7)
    expected = {i: reference_greedy(ref, p, 20) for i, p in enumerate(prompts) if i % 3 != 1}

    def params(i: int) -> SamplingParams:
        if i % 3 == 1:
            return SamplingParams(max_new_tokens=6, temperature=0.8, seed=i, ignore_eos=True)
        return SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=i % 3 == 2)

    config = EngineConfig(device="cuda", block_size=16, overlap=overlap)
    async with Engine(model, tokenizer, config) as engine:
        outs = await asyncio.gather(*(engine.generate(p, params(i)) for i, p in enumerate(prompts)))
        assert engine._runner.graphs is not None
    assert {i: outs[i].token_ids for i in expected} == expected
    assert all(len(outs[i].logprobs) == 20 for i in expected if i % 3 == 2)
