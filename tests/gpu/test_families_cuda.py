"""Every lean family and the mixture-of-experts models on CUDA: greedy equals model.generate (float32), lean path
with decode graphs, generic path with decode graphs and without, both overlap modes (skipped without CUDA)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PATHS = {
    "graphs": dict(fast_path=True, cuda_graphs=True),
    "generic": dict(fast_path=False, cuda_graphs=True),
    "generic-eager": dict(fast_path=False, cuda_graphs=False),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2-sliding", "gemma3", "phi3", "mixtral", "qwen3-moe"])
async def test_families_match_generate_on_cuda(arch, overlap, path, make_model, tokenizer):
    if path == "graphs" and arch in ("mixtral", "qwen3-moe"):
        pytest.skip("no lean adapter: generic path only")
    model, ref = make_model(arch, seed=4)
    prompts = random_prompts(8, [5, 17, 33, 64, 3, 40], len(tokenizer), seed=6)
    expected = [reference_greedy(ref, p, 24) for p in prompts]
    config = EngineConfig(device="cuda", max_num_batched_tokens=64, block_size=16, num_kv_blocks=40, overlap=overlap,
                          **PATHS[path])  # fmt: skip
    async with Engine(model, tokenizer, config) as engine:

        async def one(i, p):
            await asyncio.sleep(0.003 * (i % 4))
            return await engine.generate(p, SamplingParams(max_new_tokens=24, ignore_eos=True))

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        assert engine.fast_path == (path == "graphs")
        assert (engine._runner.graphs is not None) == (path != "generic-eager"), engine.path_reason
        if torch.cuda.get_device_capability() >= (9, 0):  # acb's kernels on either path, at ACB_PDL's level
            assert "programmatic dependent launch: level 2" in engine.path_reason, engine.path_reason
    assert [o.token_ids for o in outs] == expected


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_a_generic_model_that_cannot_be_captured_decodes_eagerly_and_says_why(overlap, make_model, tokenizer):
    """Attention soft-capping has no Triton kernel: the reference attention reads the layout on the host, so decode
    steps stay eager, the path's reason says so, and the tokens are transformers'."""
    model, ref = make_model("gemma3", seed=4, attn_logit_softcapping=30.0)
    prompts = random_prompts(4, [5, 17, 33], len(tokenizer), seed=6)
    expected = [reference_greedy(ref, p, 12) for p in prompts]
    config = EngineConfig(device="cuda", block_size=16, num_kv_blocks=40, overlap=overlap, fast_path=False)
    async with Engine(model, tokenizer, config) as engine:
        outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=12, ignore_eos=True))
                                      for p in prompts))  # fmt: skip
        assert engine._runner.graphs is None
        assert "decode steps run eagerly: attention soft-capping" in engine.path_reason
    assert [o.token_ids for o in outs] == expected
