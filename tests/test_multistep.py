"""Multi-step decode (``EngineConfig.decode_steps``): rounds of several positions per sequence give exactly the
tokens of single steps, whatever ends a request mid-round."""

from __future__ import annotations

import asyncio

import pytest
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams

LENGTHS = [5, 17, 33, 64, 3, 100, 48, 9, 71, 1]


@pytest.mark.parametrize("path", ["generic", "lean"])
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_rounds_match_generate_with_staggered_arrivals_and_preemption(overlap, path, make_model, tokenizer):
    model, ref = make_model("qwen2", seed=21)
    prompts = random_prompts(10, LENGTHS, len(tokenizer), seed=21)
    max_new = [19 + 5 * (i % 4) for i in range(len(prompts))]  # lengths that end mid-round
    expected = [reference_greedy(ref, p, n) for p, n in zip(prompts, max_new)]
    config = EngineConfig(
        block_size=8, max_num_batched_tokens=48, num_kv_blocks=26, decode_steps=4, overlap=overlap,
        fast_path=path == "lean",
    )  # fmt: skip
    async with Engine(model, tokenizer, config) as engine:

        async def one(i, p):
            await asyncio.sleep(0.004 * (i % 5))
            return await engine.generate(p, SamplingParams(max_new_tokens=max_new[i], ignore_eos=True))

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        stats = engine.stats()
    assert [o.token_ids for o in outs] == expected
    assert stats.num_preemptions > 0 and stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("steps", [3, 8])
async def test_eos_stop_tokens_and_stop_strings_mid_round_end_exactly_as_single_steps(steps, make_model, tokenizer):
    model, ref = make_model("llama", seed=23)
    prompts = random_prompts(6, [7, 19, 40], len(tokenizer), seed=23)
    free = [reference_greedy(ref, p, 30) for p in prompts]
    eos = free[0][5]
    for m in (model, ref):
        m.generation_config.eos_token_id = eos
    stop_text = tokenizer.decode(free[1][9:11])
    params = [
        SamplingParams(max_new_tokens=30),  # ends by EOS mid-round
        SamplingParams(max_new_tokens=30, ignore_eos=True, stop=[stop_text]),  # a stop string mid-round
        SamplingParams(max_new_tokens=30, ignore_eos=True, stop_token_ids=[free[2][3]]),
        SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True),
        SamplingParams(max_new_tokens=25, temperature=0.9, top_k=40, seed=5, ignore_eos=True),
        SamplingParams(max_new_tokens=13, ignore_eos=True),
    ]

    async def run(decode_steps: int):
        config = EngineConfig(block_size=8, decode_steps=decode_steps)
        async with Engine(model if decode_steps > 1 else ref_copy, tokenizer, config) as engine:
            outs = await asyncio.gather(*(engine.generate(p, q) for p, q in zip(prompts, params)))
            streamed = [t async for t in engine.stream(prompts[1], params[1])]
            assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        return outs, streamed

    import copy

    ref_copy = copy.deepcopy(model)
    single, single_stream = await run(1)
    rounds, rounds_stream = await run(steps)
    for a, b in zip(single, rounds):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert a.logprobs == (None if b.logprobs is None else pytest.approx(b.logprobs, abs=1e-5))
    assert single[0].finish_reason == "stop" and single[0].token_ids[-1] == eos
    assert single[1].finish_reason == "stop" and stop_text not in single[1].text
    assert [(t.id, t.text) for t in single_stream] == [(t.id, t.text) for t in rounds_stream]


async def test_a_request_arriving_mid_round_starts_in_the_next_step(make_model, tokenizer):
    model, ref = make_model("llama", seed=25)
    prompts = random_prompts(2, [12, 30], len(tokenizer), seed=25)
    async with Engine(model, tokenizer, EngineConfig(decode_steps=8, block_size=8)) as engine:
        first = asyncio.create_task(engine.generate(prompts[0], SamplingParams(max_new_tokens=60, ignore_eos=True)))
        await asyncio.sleep(0.05)
        second = await engine.generate(prompts[1], SamplingParams(max_new_tokens=10, ignore_eos=True))
        assert not first.done()  # joined the running batch
        assert (await first).token_ids == reference_greedy(ref, prompts[0], 60)
    assert second.token_ids == reference_greedy(ref, prompts[1], 10)


async def test_stream_interval_wakes_the_consumer_in_chunks(make_model, tokenizer):
    model, ref = make_model("llama", seed=27)
    prompt = random_prompts(1, [9], len(tokenizer), seed=27)[0]
    want = reference_greedy(ref, prompt, 21)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        stream = engine.stream(prompt, SamplingParams(max_new_tokens=21, ignore_eos=True), stream_interval=5)
        got, waiting = [], []
        async for tok in stream:
            got.append(tok.id)
            waiting.append(len(stream._state.channel._items))  # what the wake-up brought beyond this token
        assert got == want
        # first token at once; then chunks of at least five (the last chunk may be shorter)
        wakes = [i for i in range(1, len(waiting)) if waiting[i - 1] == 0]
        assert wakes and all(waiting[i] >= 4 for i in wakes[:-1])
        with pytest.raises(ValueError):
            engine.stream(prompt, stream_interval=0)
