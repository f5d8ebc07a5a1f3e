"""Bad input gets a typed error at the boundary; failures inside the engine end only the requests they touch."""

from __future__ import annotations

import asyncio

import pytest
from conftest import random_prompts, reference_greedy

from acb import (
    DuplicateRequestIdError,
    Engine,
    EngineClosedError,
    EngineConfig,
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    RequestFailedError,
    SamplingParams,
)

OK = SamplingParams(max_new_tokens=8, ignore_eos=True)


class _BadParams:
    pass


@pytest.mark.parametrize(
    "prompt, params, error",
    [
        ("", None, InvalidPromptError),
        ([], None, InvalidPromptError),
        ([1, 2, 10**6], None, InvalidPromptError),
        ([1, -2], None, InvalidPromptError),
        ([1, "x"], None, InvalidPromptError),
        (12345, None, InvalidPromptError),
        (b"bytes", None, InvalidPromptError),
        ([5] * 300, None, PromptTooLongError),  # longer than max_model_len
        ([5] * 100, SamplingParams(max_new_tokens=100), PromptTooLongError),  # needs more KV than the whole cache
        ("hi", _BadParams(), InvalidSamplingParamsError),
        ("hi", SamplingParams(stop_token_ids=[10**6]), InvalidSamplingParamsError),
    ],
)
async def test_bad_input_is_rejected_and_the_engine_keeps_serving(prompt, params, error, make_model, tokenizer):
    model, ref = make_model("llama")
    config = EngineConfig(max_model_len=256, num_kv_blocks=10, block_size=16)  # 160 cache slots
    async with Engine(model, tokenizer, config) as engine:
        with pytest.raises(error):
            async for _ in engine.stream(prompt, params):
                pass
        out = await engine.generate([7, 8, 9], OK)
        assert out.token_ids == reference_greedy(ref, [7, 8, 9], 8)
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


async def test_duplicate_request_id(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer) as engine:
        first = engine.stream("hello", SamplingParams(max_new_tokens=200, ignore_eos=True), request_id="same")
        await first.__anext__()
        with pytest.raises(DuplicateRequestIdError):
            await engine.generate("again", OK, request_id="same")
        await first.aclose()
        assert (await engine.generate("again", OK, request_id="same")).finish_reason == "length"


async def test_closed_and_unstarted_engine(make_model, tokenizer):
    model, _ = make_model("llama")
    engine = Engine(model, tokenizer)
    with pytest.raises(EngineClosedError, match="async with"):
        await engine.generate("hi", OK)
    async with engine:
        await engine.generate("hi", OK)
    with pytest.raises(EngineClosedError):
        await engine.generate("hi", OK)


async def test_a_failing_step_fails_exactly_its_batch(make_model, tokenizer):
    model, ref = make_model("llama", seed=51)
    forward = model.forward
    calls = {"n": 0, "boom": None}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["boom"]:
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    model.forward = flaky
    prompts = random_prompts(4, [6, 9], len(tokenizer), seed=51)
    async with Engine(model, tokenizer, EngineConfig(overlap=False)) as engine:
        # Two requests share the batches; the third step raises.
        calls["boom"] = 3
        results = await asyncio.gather(*(engine.generate(p, OK) for p in prompts[:2]), return_exceptions=True)
        assert all(isinstance(r, RequestFailedError) for r in results)
        assert isinstance(results[0].__cause__, RuntimeError)
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        # The engine serves the next requests, correctly.
        outs = await asyncio.gather(*(engine.generate(p, OK) for p in prompts[2:]))
        assert [o.token_ids for o in outs] == [reference_greedy(ref, p, 8) for p in prompts[2:]]


async def test_a_failing_step_under_overlap_spares_requests_outside_it(make_model, tokenizer):
    model, ref = make_model("llama", seed=53)
    forward = model.forward
    state = {"fail_tokens": None}

    def flaky(*args, input_ids=None, **kwargs):
        if state["fail_tokens"] is not None and input_ids.shape[1] == state["fail_tokens"]:
            state["fail_tokens"] = None
            raise RuntimeError("injected fault")
        return forward(*args, input_ids=input_ids, **kwargs)

    model.forward = flaky
    victim, bystander = random_prompts(2, [37, 5], len(tokenizer), seed=53)
    async with Engine(model, tokenizer, EngineConfig(overlap=True)) as engine:
        state["fail_tokens"] = 37  # the step that prefills the victim's prompt, alone
        failing = asyncio.create_task(engine.generate(victim, OK))
        with pytest.raises(RequestFailedError):
            await failing
        out = await engine.generate(bystander, OK)
        assert out.token_ids == reference_greedy(ref, bystander, 8)
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


async def test_a_tokenizer_error_fails_one_request(make_model, tokenizer):
    model, ref = make_model("llama")
    engine = Engine(model, tokenizer)
    encode = tokenizer.encode

    class Boom(Exception):
        pass

    def picky(text, *a, **k):
        if "poison" in text:
            raise Boom("cannot tokenize")
        return encode(text, *a, **k)

    engine._admission.tokenizer = type("T", (), {"encode": staticmethod(picky)})()
    async with engine:
        bad = asyncio.create_task(engine.generate("poison pill", OK))
        good = asyncio.create_task(engine.generate("fine", OK))
        with pytest.raises(RequestFailedError) as info:
            await bad
        assert isinstance(info.value.__cause__, Boom)
        assert (await good).token_ids == reference_greedy(ref, encode("fine"), 8)


async def test_a_crashed_stage_fails_live_requests_instead_of_hanging(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer) as engine:
        stream = engine.stream("hello", SamplingParams(max_new_tokens=10_000 // 10, ignore_eos=True))
        await stream.__anext__()

        def broken():
            raise AssertionError("scheduler bug")

        engine._scheduler.schedule = broken
        with pytest.raises(RequestFailedError):
            async with asyncio.timeout(5):
                async for _ in stream:
                    pass
        with pytest.raises(EngineClosedError):
            await engine.generate("more", OK)
