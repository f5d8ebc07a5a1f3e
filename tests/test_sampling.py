"""Sampling: seeded reproducibility whatever shares the batch, filters, and the noise generator itself."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams
from acb.sampling import SamplingTensors, sample, uniform_noise

SEEDED = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)


async def test_seeded_sampling_is_reproducible_whatever_the_batch(make_model, tokenizer):
    model, _ = make_model("llama", seed=21)
    prompt = random_prompts(1, [15], len(tokenizer), seed=21)[0]
    others = random_prompts(12, [3, 40, 70, 9], len(tokenizer), seed=22)
    async with Engine(model, tokenizer, EngineConfig(max_num_batched_tokens=64, block_size=8)) as engine:
        alone = await engine.generate(prompt, SEEDED)
        noise = SamplingParams(max_new_tokens=30, temperature=0.7, ignore_eos=True)
        crowd = [asyncio.create_task(engine.generate(p, noise)) for p in others[:6]]
        await asyncio.sleep(0.01)  # join mid-flight: different batch sizes and neighbours at every step
        busy = asyncio.create_task(engine.generate(prompt, SEEDED))
        crowd += [asyncio.create_task(engine.generate(p, noise)) for p in others[6:]]
        busy = await busy
        await asyncio.gather(*crowd)
        other_seed = await engine.generate(prompt, SamplingParams(**{**_fields(SEEDED), "seed": 99}))
    assert busy.token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids


async def test_seeded_sampling_survives_preemption(make_model, tokenizer):
    model, _ = make_model("llama", seed=23)
    prompts = random_prompts(8, [30, 50, 20], len(tokenizer), seed=23)
    params = [SamplingParams(**{**_fields(SEEDED), "seed": i}) for i in range(len(prompts))]
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as roomy:
        calm = [await roomy.generate(p, sp) for p, sp in zip(prompts, params)]
    model2, _ = make_model("llama", seed=23)
    async with Engine(model2, tokenizer, EngineConfig(block_size=8, num_kv_blocks=12)) as tight:
        squeezed = await asyncio.gather(*(tight.generate(p, sp) for p, sp in zip(prompts, params)))
        assert tight.stats().num_preemptions > 0
    assert [c.token_ids for c in squeezed] == [c.token_ids for c in calm]


async def test_top_k_1_and_tiny_top_p_are_greedy(make_model, tokenizer):
    model, ref = make_model("qwen2", seed=25)
    prompt = random_prompts(1, [11], len(tokenizer), seed=25)[0]
    expected = reference_greedy(ref, prompt, 12)
    async with Engine(model, tokenizer) as engine:
        k1 = await engine.generate(prompt, SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1, ignore_eos=True))
        p0 = await engine.generate(
            prompt, SamplingParams(max_new_tokens=12, temperature=2.0, top_p=1e-6, ignore_eos=True)
        )
    assert k1.token_ids == expected
    assert p0.token_ids == expected


async def test_stop_strings_end_the_stream_and_are_not_emitted(make_model, tokenizer):
    model, ref = make_model("llama", seed=27)
    prompt = random_prompts(1, [9], len(tokenizer), seed=27)[0]
    free = reference_greedy(ref, prompt, 40)
    text = tokenizer.decode(free, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and "\ufffd" not in stop
    cut = text.find(stop)
    async with Engine(model, tokenizer) as engine:
        toks = [t async for t in engine.stream(prompt, SamplingParams(max_new_tokens=40, stop=["never-there", stop]))]
        after = await engine.generate(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    streamed = "".join(t.text for t in toks)
    assert streamed == text[:cut]
    assert toks[-1].finish_reason == "stop"
    assert [t.id for t in toks] == free[: len(toks)]  # stopped at the token that completed the stop string
    assert stop not in streamed
    assert after.token_ids == free[:5]  # the engine serves the next request


async def test_stop_token_ids_end_the_stream(make_model, tokenizer):
    model, ref = make_model("llama", seed=29)
    prompt = random_prompts(1, [9], len(tokenizer), seed=29)[0]
    free = reference_greedy(ref, prompt, 30)
    stop_id = free[10]
    k = free.index(stop_id)
    async with Engine(model, tokenizer) as engine:
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=30, stop_token_ids=[stop_id]))
    assert out.token_ids == free[: k + 1]
    assert out.finish_reason == "stop"
    assert out.text == tokenizer.decode(free[:k], skip_special_tokens=True)  # the stop token's text is not emitted


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


# -- the sampler on its own ---------------------------------------------------------------------------------------


def _params(n, temperature=1.0, top_k=0, top_p=1.0, seeds=None, positions=None):
    return SamplingTensors(
        temperature=torch.full((n,), temperature),
        top_k=torch.full((n,), top_k, dtype=torch.int64),
        top_p=torch.full((n,), top_p),
        seeds=torch.arange(n, dtype=torch.int64) if seeds is None else seeds,
        positions=torch.zeros(n, dtype=torch.int64) if positions is None else positions,
        all_greedy=temperature == 0,
        needs_filter=top_k > 0 or top_p < 1,
        needs_logprobs=True,
    )


def test_noise_is_uniform_and_a_pure_function_of_seed_and_position():
    seeds = torch.tensor([0, 1, 2**32 - 1], dtype=torch.int64)
    pos = torch.tensor([0, 5, 7], dtype=torch.int64)
    u = uniform_noise(seeds, pos, 4096)
    assert torch.equal(u, uniform_noise(seeds, pos, 4096))
    assert torch.equal(u[1:2], uniform_noise(seeds[1:2], pos[1:2], 4096))  # independent of the other rows
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], uniform_noise(seeds[:1], pos[:1] + 1, 4096)[0])


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, -1).contiguous()
    tokens, logprobs, _ = sample(logits, _params(n))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015)
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-5)


def test_top_k_and_top_p_restrict_support():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 4000
    logits = probs.log().expand(n, -1).contiguous()
    k2, _, _ = sample(logits, _params(n, top_k=2))
    assert set(k2.tolist()) == {0, 1}
    p65, _, _ = sample(logits, _params(n, top_p=0.65))  # 0.4 + 0.3 reaches 0.65: tokens 0 and 1
    assert set(p65.tolist()) == {0, 1}
    greedy, _, _ = sample(logits, _params(n, temperature=0.0))
    assert set(greedy.tolist()) == {0}


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("seed", "x")],
)
def test_invalid_params_raise_typed_errors(field, value):
    from acb import InvalidSamplingParamsError

    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams(**{field: value})
