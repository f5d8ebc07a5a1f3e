"""Reliability: the chaos soak, precise fault injection, memory pressure, and shutdown under load."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings

import pytest
from conftest import random_prompts
from soak import soak

from acb import Engine, EngineClosedError, EngineConfig, RequestFailedError, SamplingParams
from acb.default_model import tiny_model


@pytest.mark.loops("asyncio")
async def test_chaos_soak(request, tokenizer, caplog):
    n = 10_000 if request.config.getoption("--soak-long") else 2_000
    caplog.set_level(logging.CRITICAL, logger="acb")  # injected faults log tracebacks
    report = await soak(lambda: tiny_model("llama", seed=7), tokenizer, n, seed=1)
    assert report.problems() == []
    # the chaos really happened, of every kind
    assert report.requests == n and report.finished > n // 3
    assert set(report.cancelled) == {"break", "task_cancel", "abort", "timeout"}
    assert all(v > 0 for v in report.cancelled.values())
    assert report.invalid > 0 and report.faults_injected > 0 and report.failed_by_fault > 0
    assert report.preemptions > 0 and report.slow_consumers > 0
    assert report.prefix_cache_hits > 0  # repeated prompts: the prefix cache shares blocks under all of the above
    assert report.checked_against_reference > n // 2
    # the adversarial inputs were mixed in, and each was handled as promised (problems() checks the counts)
    assert report.poisoned > 0 and report.second_consumers_refused > 0
    assert report.other_loops_refused > 0


@pytest.mark.loops("uvloop")
async def test_chaos_soak_with_multi_step_rounds(tokenizer, caplog):
    """The same chaos, with decode rounds of three positions: requests end, get cancelled and fail mid-round."""
    caplog.set_level(logging.CRITICAL, logger="acb")
    config = EngineConfig(
        max_num_seqs=64, max_num_batched_tokens=256, block_size=8, num_kv_blocks=160, max_model_len=256, decode_steps=3
    )
    report = await soak(lambda: tiny_model("llama", seed=7), tokenizer, 1_000, seed=2, config=config)
    assert report.problems() == []
    assert report.finished > 300 and report.checked_against_reference > 500 and report.preemptions > 0


@pytest.mark.loops("asyncio")
async def test_chaos_soak_with_longest_first_admission(tokenizer, caplog):
    """The same chaos with the queue ordered by output budget: requests cancelled while queued (their heap entries
    left behind), bursts past max_pending, faults; every output still equals the calm reference run's."""
    caplog.set_level(logging.CRITICAL, logger="acb")
    config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=256, block_size=8, num_kv_blocks=160,
                          max_model_len=256, admission_order="longest_first")  # fmt: skip
    report = await soak(lambda: tiny_model("llama", seed=7), tokenizer, 1_000, seed=3, config=config)
    assert report.problems() == []
    assert report.finished > 300 and report.checked_against_reference > 500


async def test_a_faulting_step_fails_exactly_the_requests_in_it(make_model, tokenizer, caplog):
    caplog.set_level(logging.CRITICAL, logger="acb")
    model, _ = make_model("llama", seed=71)
    forward = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected")
        return forward(*args, **kwargs)

    model.forward = flaky
    prompts = random_prompts(10, [3, 20, 50], len(tokenizer), seed=71)
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, block_size=8))
    members: dict[int, set[str]] = {}
    launch = engine._runner.launch

    def recording_launch(batch):
        members[len(members) + 1] = {e.seq.request_id for e in batch.step.entries}
        return launch(batch)

    engine._runner.launch = recording_launch
    async with engine:
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        results = await asyncio.gather(
            *(engine.generate(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)), return_exceptions=True
        )
        failed = {f"r{i}" for i, r in enumerate(results) if isinstance(r, RequestFailedError)}
        assert all(isinstance(r, RequestFailedError) or r.finish_reason == "length" for r in results)
        assert failed == members[6]  # launches and forwards pair up: steps run in launch order
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        again = await engine.generate(prompts[0], params)
        assert again.finish_reason == "length"


async def test_memory_pressure_preempts_without_deadlock_or_changed_outputs(make_model, tokenizer):
    model, _ = make_model("qwen2", seed=73)
    calm_model, _ = make_model("qwen2", seed=73)
    prompts = random_prompts(40, [10, 30, 60], len(tokenizer), seed=73)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    async with Engine(calm_model, tokenizer, EngineConfig(block_size=8)) as calm:
        expected = [o.token_ids for o in await asyncio.gather(*(calm.generate(p, params) for p in prompts))]
    async with Engine(model, tokenizer, EngineConfig(block_size=8, num_kv_blocks=12)) as tight:
        async with asyncio.timeout(120):
            outs = await asyncio.gather(*(tight.generate(p, params) for p in prompts))
        assert tight.stats().num_preemptions > 10
        assert tight.stats().kv_blocks_free == 12
    assert [o.token_ids for o in outs] == expected


async def test_shutdown_under_load_ends_every_stream_cleanly_in_debug_mode(make_model, tokenizer, caplog):
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 1.0  # debug mode's slow-callback report is about CPU hiccups, not leaks
    caplog.set_level(logging.WARNING, logger="asyncio")
    model, _ = make_model("llama")
    prompts = random_prompts(24, [5, 40], len(tokenizer), seed=75)
    outcomes = []

    async def consume(engine, p, slow):
        try:
            async for tok in engine.stream(p, SamplingParams(max_new_tokens=500, ignore_eos=True)):
                if slow:
                    await asyncio.sleep(0.002)
                if tok.finish_reason:
                    outcomes.append(tok.finish_reason)
        except EngineClosedError:
            outcomes.append("closed")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = Engine(model, tokenizer, EngineConfig(drain_timeout=0.2, max_pending=8))
        async with engine:
            tasks = [asyncio.create_task(consume(engine, p, i % 3 == 0)) for i, p in enumerate(prompts)]
            await asyncio.sleep(0.1)
        async with asyncio.timeout(5):  # every stream ends within a bound
            await asyncio.gather(*tasks)
        assert len(outcomes) == len(prompts)
        assert "closed" in outcomes
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        assert all(t.done() for t in engine._tasks)
        del tasks, engine
        gc.collect()
        await asyncio.sleep(0)
    loop.set_debug(False)
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert messages == []  # no "Task was destroyed but it is pending", no unretrieved exceptions
