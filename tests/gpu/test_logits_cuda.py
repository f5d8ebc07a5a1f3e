"""Penalties, biases, top logprobs and grammars on CUDA: greedy equals model.generate with transformers' processors
(float32), with decode graphs on, in both overlap modes; constrained outputs parse (skipped without CUDA)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PATHS = {"graphs": dict(fast_path=True, cuda_graphs=True), "generic": dict(fast_path=False)}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}},
    "required": ["name", "n", "tags"],
    "additionalProperties": False,
}  # fmt: skip


def _generate(ref, prompt, n, **kwargs):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=n,
                           **kwargs)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("decode_steps", [1, 4], ids=["single", "rounds"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_processed_and_constrained_rows_beside_plain_ones_on_cuda(overlap, path, decode_steps, make_model,
                                                                        tokenizer):  # fmt: skip
    model, ref = make_model("llama", seed=31)
    prompts = random_prompts(6, [9, 40, 3], len(tokenizer), seed=31)
    plain = [reference_greedy(ref, p, 20) for p in prompts[:3]]
    rep = _generate(ref, prompts[3], 20, repetition_penalty=1.6)
    bias = _generate(ref, prompts[4], 20, sequence_bias={(12,): 5.0, (13,): -100.0})
    config = EngineConfig(device="cuda", block_size=16, max_num_batched_tokens=64, overlap=overlap,
                          decode_steps=decode_steps, **PATHS[path])  # fmt: skip
    async with Engine(model, tokenizer, config) as engine:

        async def one(i, coro):
            await asyncio.sleep(0.002 * i)
            return await coro

        g = SamplingParams(max_new_tokens=20, ignore_eos=True)
        outs = await asyncio.gather(*(one(i, c) for i, c in enumerate([
            engine.generate(prompts[0], g), engine.generate(prompts[1], g), engine.generate(prompts[2], g),
            engine.generate(prompts[3], SamplingParams(max_new_tokens=20, ignore_eos=True, repetition_penalty=1.6)),
            engine.generate(prompts[4], SamplingParams(max_new_tokens=20, ignore_eos=True,
                                                       logit_bias={12: 5.0, 13: -100.0})),
            engine.generate(prompts[5], SamplingParams(max_new_tokens=20, ignore_eos=True, top_logprobs=4)),
            engine.generate("j", SamplingParams(max_new_tokens=200, json_schema=SCHEMA)),
            engine.generate("r", SamplingParams(max_new_tokens=40, regex="[a-z]{3}-[0-9]{2}", temperature=1.0,
                                                seed=3)),
        ])))  # fmt: skip
        stats = engine.stats()
    assert [o.token_ids for o in outs[:3]] == plain
    assert outs[3].token_ids == rep and outs[4].token_ids == bias
    with torch.no_grad():
        logits = ref(torch.tensor([prompts[5] + outs[5].token_ids])).logits[0, len(prompts[5]) - 1 : -1]
    top = logits.float().log_softmax(-1).topk(4, dim=-1)
    assert [[a[0] for a in t] for t in outs[5].top_logprobs] == top.indices.tolist()
    data = json.loads(outs[6].text)
    assert set(data) == {"name", "n", "tags"} and 0 <= data["n"] <= 99
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", outs[7].text)
    assert stats.kv_blocks_free == stats.kv_blocks_total
