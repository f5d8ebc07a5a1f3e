"""What an adversarial caller could break: one request's values never fail the others, huge inputs are refused
before any work, every request is accounted for, and close() is bounded even by a step that never finishes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from conftest import break_preparation_of, random_prompts, reference_greedy
from soak import POISON, poison

from acb import (
    Engine,
    EngineClosedError,
    EngineConfig,
    InvalidPromptError,
    InvalidRequestError,
    PromptTooLongError,
    RequestFailedError,
    SamplingParams,
)

PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("logprobs", [False, True])
async def test_non_finite_logits_fail_only_their_request(make_model, tokenizer, logprobs):
    model, ref = make_model("llama", seed=3)
    poison(model)
    prompts = random_prompts(9, [4, 9, 17], len(tokenizer), seed=3)
    prompts = [[t if t != POISON else 4 for t in p] for p in prompts]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=logprobs)
    async with Engine(model, tokenizer, EngineConfig(block_size=4)) as engine:
        results = await asyncio.gather(
            *(engine.generate(p, params) for p in prompts[:4]),
            engine.generate([7, POISON, 9], params),
            *(engine.generate(p, params) for p in prompts[4:]),
            return_exceptions=True,
        )
        bad = results.pop(4)
        assert isinstance(bad, RequestFailedError) and "non-finite" in str(bad)
        for p, r in zip(prompts, results):
            assert r.token_ids == reference_greedy(ref, p, 10)
            if logprobs:
                assert all(lp <= 0.0 for lp in r.logprobs)
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


async def test_a_step_that_cannot_be_prepared_fails_only_the_request_that_broke_it(make_model, tokenizer, caplog):
    """Parameters are validated at construction, so nothing a user sends can break batch preparation today; this
    proves the last line of defence holds if some value still does: its request fails, the step's others go on."""
    caplog.set_level(logging.CRITICAL, logger="acb")
    model, ref = make_model("llama", seed=5)
    prompts = random_prompts(10, [3, 12], len(tokenizer), seed=5)
    async with Engine(model, tokenizer) as engine:
        break_preparation_of(engine, "bad")
        results = await asyncio.gather(
            *(engine.generate(p, PARAMS, request_id=f"r{i}") for i, p in enumerate(prompts)),
            engine.generate([5, 6], PARAMS, request_id="bad"),
            return_exceptions=True,
        )
        assert isinstance(results[-1], RequestFailedError)
        assert [r.token_ids for r in results[:-1]] == [reference_greedy(ref, p, 10) for p in prompts]
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


async def test_huge_prompts_are_refused_before_tokenizing(make_model, tokenizer, monkeypatch):
    model, _ = make_model("llama")
    config = EngineConfig(max_model_len=256, max_prompt_chars=5_000)
    async with Engine(model, tokenizer, config) as engine:
        calls = []
        encode = tokenizer.encode
        monkeypatch.setattr(
            tokenizer, "encode", lambda text, *a, **k: (calls.append(len(text)), encode(text, *a, **k))[1]
        )
        template = tokenizer.apply_chat_template
        monkeypatch.setattr(
            tokenizer, "apply_chat_template", lambda *a, **k: (calls.append("chat"), template(*a, **k))[1]
        )
        for prompt in ("word " * 200_000, "x" * 5_001):
            with pytest.raises(PromptTooLongError, match="max_prompt_chars"):
                await engine.generate(prompt, PARAMS)
        with pytest.raises(PromptTooLongError):
            await engine.apply_chat_template([{"role": "user", "content": "y" * 3_000}] * 2)
        with pytest.raises(PromptTooLongError):  # a token list: refused by its length, before its elements
            await engine.generate([1] * 10**6, PARAMS)
        assert calls == []
        # under the bound, a long prompt is tokenized in the engine's own thread, not on the loop or the default pool
        threads = []
        monkeypatch.setattr(
            tokenizer, "encode", lambda *a, **k: (threads.append(threading.current_thread().name), [5])[1]
        )
        await engine.generate("z" * 4_000, PARAMS)
        assert threads and threads[0].startswith("acb-tokenizer")


async def test_a_chat_is_bounded_by_its_prompt_rendered_with_the_template(make_model, tokenizer):
    """``max_prompt_chars`` counts a chat as the prompt its template renders. Contents just under the limit used to
    pass ``apply_chat_template`` and then be refused at submit as "the prompt has N characters"."""
    model, ref = make_model("llama", seed=8)
    near = [{"role": "user", "content": "y" * 990}]
    rendered = tokenizer.apply_chat_template(near, tokenize=False, add_generation_prompt=True)
    assert len(rendered) > 1000
    async with Engine(model, tokenizer, EngineConfig(max_prompt_chars=1000)) as engine:
        with pytest.raises(PromptTooLongError) as info:
            await engine.apply_chat_template(near)
        assert f"has {len(rendered)} characters; at most 1000" in str(info.value)
        assert "rendered with the chat template, its text included" in str(info.value)
        assert info.value.param == "prompt"
        with pytest.raises(PromptTooLongError, match="contents alone, before the chat template"):
            await engine.apply_chat_template([{"role": "user", "content": "y" * 1001}])  # before rendering
        within = [{"role": "user", "content": "a short question"}]
        prompt = await engine.apply_chat_template(within)
        assert prompt == tokenizer.apply_chat_template(within, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(prompt)
        assert (await engine.generate(prompt, PARAMS)).token_ids == reference_greedy(ref, ids, 10)


@pytest.mark.parametrize("prompt", ["ok \ud800 no", "\udfff"])
async def test_lone_surrogates_are_bad_input_not_engine_failures(make_model, tokenizer, prompt):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer) as engine:
        with pytest.raises(InvalidPromptError, match="Unicode"):
            await engine.generate(prompt, PARAMS)
        with pytest.raises(InvalidPromptError, match="Unicode"):
            await engine.apply_chat_template([{"role": "user", "content": prompt}])


async def test_request_ids_and_abort_take_strings_only(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer) as engine:
        for rid in ([1], {"a": 1}, 5):
            with pytest.raises(InvalidRequestError, match="request_id"):
                await engine.generate("hi", PARAMS, request_id=rid)
            with pytest.raises(InvalidRequestError, match="request_id"):
                engine.abort(rid)
        assert (await engine.generate("hi", PARAMS)).finish_reason == "length"


async def test_every_request_is_counted_in_exactly_one_state(make_model, tokenizer):
    model, _ = make_model("llama")
    config = EngineConfig(max_num_seqs=2, max_pending=3, drain_timeout=0.1)
    engine = Engine(model, tokenizer, config)
    async with engine:
        streams = [engine.stream([5, 6, i + 7], SamplingParams(max_new_tokens=2000, ignore_eos=True)) for i in range(9)]
        firsts = [asyncio.create_task(s.__anext__()) for s in streams]
        await asyncio.sleep(0.2)
        s = engine.stats()
        assert (s.num_running, s.num_waiting, s.num_pending) == (2, 3, 4)
        for s_ in streams[2:4] + streams[6:8]:  # two queued, two blocked on max_pending
            await s_.aclose()
        await asyncio.sleep(0.05)
        s = engine.stats()
        assert (s.num_running, s.num_waiting, s.num_pending) == (2, 3, 0)  # the blocked ones moved up
        assert s.num_running + s.num_waiting + s.num_pending == len(engine._live)
        await engine.close(drain=False)
        s = engine.stats()
        assert (s.num_running, s.num_waiting, s.num_pending) == (0, 0, 0)
        assert s.kv_blocks_free == s.kv_blocks_total
        outcomes = await asyncio.gather(*firsts, return_exceptions=True)
        for i, o in enumerate(outcomes):
            if i in (2, 3, 6, 7):  # closed by their consumer: the in-flight read gets the abort marker
                assert o.finish_reason == "abort", o
            else:  # running ones got a token; the others were failed by close()
                assert isinstance(o, EngineClosedError) or o.id is not None, o


async def test_close_is_bounded_by_drain_timeout_even_when_a_step_hangs(make_model, tokenizer, caplog):
    caplog.set_level(logging.CRITICAL, logger="acb")
    model, _ = make_model("llama")
    release = threading.Event()
    forward = model.forward
    calls = {"n": 0}

    def hanging(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            release.wait(30)
        return forward(*args, **kwargs)

    model.forward = hanging
    engine = Engine(model, tokenizer, EngineConfig(drain_timeout=0.5))
    await engine.start()
    task = asyncio.create_task(engine.generate([5, 6, 7], SamplingParams(max_new_tokens=50, ignore_eos=True)))
    while calls["n"] < 3:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await engine.close()
    took = time.monotonic() - t0
    release.set()
    assert took < 5, took
    with pytest.raises(EngineClosedError):
        await task


async def test_a_tokenizer_with_tokens_the_model_lacks_is_refused_at_admission(make_model, tokenizer):
    """A text prompt whose tokens fall outside the model's vocabulary (a tokenizer that does not match the model)
    gets InvalidPromptError at admission, short or long (tokenized off the loop), and the engine serves on; in a
    step it would fail (on CUDA: a device assert that ends every request)."""
    model, _ = make_model("llama")
    engine = Engine(model, tokenizer, EngineConfig(long_prompt_chars=64))
    vocab = model.config.vocab_size
    encode = tokenizer.encode

    class Mismatched:
        def encode(self, text, *args, **kwargs):
            return [*encode(text, *args, **kwargs), vocab + 3] if "extra" in text else encode(text, *args, **kwargs)

    async with engine:
        engine._admission.tokenizer = Mismatched()
        for prompt in ("an extra token", "an extra token " * 10):
            with pytest.raises(InvalidPromptError, match=f"token id {vocab + 3}, outside the model's vocabulary"):
                await engine.generate(prompt, PARAMS)
        assert (await engine.generate("a fine prompt", PARAMS)).finish_reason == "length"
