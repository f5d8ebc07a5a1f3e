"""Start, drain, close, backpressure."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineClosedError, EngineConfig, InvalidConfigError, SamplingParams


async def test_leaving_async_with_drains_running_requests(make_model, tokenizer):
    model, ref = make_model("llama")
    prompts = random_prompts(4, [5, 9], len(tokenizer))
    async with Engine(model, tokenizer) as engine:
        tasks = [
            asyncio.create_task(engine.generate(p, SamplingParams(max_new_tokens=12, ignore_eos=True))) for p in prompts
        ]
        await asyncio.sleep(0)
    outs = await asyncio.gather(*tasks)
    assert [o.token_ids for o in outs] == [reference_greedy(ref, p, 12) for p in prompts]


async def test_close_past_the_drain_timeout_fails_what_is_left(make_model, tokenizer):
    model, _ = make_model("llama")
    engine = Engine(model, tokenizer, EngineConfig(drain_timeout=0.05))
    await engine.start()
    tasks = [
        asyncio.create_task(engine.generate(f"p{i}", SamplingParams(max_new_tokens=100_000 // 100, ignore_eos=True)))
        for i in range(3)
    ]
    await asyncio.sleep(0.02)
    await asyncio.wait_for(engine.close(), 5)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, EngineClosedError) or r.finish_reason == "length" for r in results)
    assert any(isinstance(r, EngineClosedError) for r in results)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
    assert all(t.done() for t in engine._tasks)


async def test_an_exception_in_the_body_closes_without_draining(make_model, tokenizer):
    model, _ = make_model("llama")
    with pytest.raises(ZeroDivisionError):
        async with Engine(model, tokenizer) as engine:
            task = asyncio.create_task(engine.generate("p", SamplingParams(max_new_tokens=5000 // 10, ignore_eos=True)))
            await asyncio.sleep(0.01)
            1 / 0
    with pytest.raises(EngineClosedError):
        await task


async def test_an_infinite_drain_timeout_closes_and_gives_the_model_back(make_model, tokenizer):
    """``drain_timeout=inf`` waits as long as requests take; it used to overflow the worker thread's join, leaving
    the engine half closed and the model refused to every later engine."""
    model, ref = make_model("llama", seed=2)
    prompt = random_prompts(1, [9], len(tokenizer), seed=2)[0]
    async with Engine(model, tokenizer, EngineConfig(drain_timeout=float("inf"))) as engine:
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, prompt, 4)
    async with Engine(model, tokenizer) as engine:  # the model is free again
        assert (await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))).token_ids == (
            out.token_ids
        )


async def test_a_refused_configuration_leaves_the_model_as_it_was(make_model, tokenizer):
    """An engine that cannot be built (here: the lean path asked of a model with no lean adapter) raises its typed
    error and gives the model its own attention back: ``model.generate`` still works, and so does the next engine."""
    import torch

    model, ref = make_model("mixtral", seed=1)
    with pytest.raises(ValueError, match="fast_path=True"):
        Engine(model, tokenizer, EngineConfig(fast_path=True))
    ids = torch.tensor([random_prompts(1, [7], len(tokenizer), seed=1)[0]])
    assert (
        model.generate(ids, max_new_tokens=3, do_sample=False).tolist()
        == ref.generate(ids, max_new_tokens=3, do_sample=False).tolist()
    )
    async with Engine(model, tokenizer) as engine:
        await engine.generate(ids[0].tolist(), SamplingParams(max_new_tokens=2))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.mark.parametrize(
    "device", ["meta", "tpu", "mps", "cuda:99", "cuda:x", "", 123, pytest.param("cuda", marks=NO_CUDA)]
)
async def test_a_device_acb_cannot_run_on_is_refused_before_the_model_moves(make_model, tokenizer, device):
    """``device="meta"`` used to move the model there first (its weights gone for good) and fail later with a
    TypeError; a GPU the machine lacks failed inside torch. Both are refused, typed, before the model is touched."""
    model, ref = make_model("llama", seed=4)
    with pytest.raises(InvalidConfigError, match="device"):
        Engine(model, tokenizer, EngineConfig(device=device))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ids = torch.tensor([random_prompts(1, [7], len(tokenizer), seed=4)[0]])
    assert (
        model.generate(ids, max_new_tokens=3, do_sample=False).tolist()
        == ref.generate(ids, max_new_tokens=3, do_sample=False).tolist()
    )
    async with Engine(model, tokenizer, EngineConfig(device="cpu")) as engine:
        out = await engine.generate(ids[0].tolist(), SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, ids[0].tolist(), 3)


def test_a_model_on_the_meta_device_is_refused(tokenizer):
    from transformers import AutoModelForCausalLM

    from acb.default_model import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(InvalidConfigError, match="meta"):
        Engine(model, tokenizer)


async def test_a_model_cast_between_engines_gets_its_lean_weights_fused_again(make_model, tokenizer):
    """The lean model keeps fused copies of the weights for the next engine; a model cast since (``dtype=`` here)
    holds new weights, so the old fusion is dropped (it used to fail every step on mixed dtypes)."""
    import torch

    model, _ = make_model("llama", seed=5)
    prompt = random_prompts(1, [11], len(tokenizer), seed=5)[0]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    async with Engine(model, tokenizer, EngineConfig(fast_path=True)) as engine:
        await engine.generate(prompt, params)
    async with Engine(model, tokenizer, EngineConfig(fast_path=True, dtype="bfloat16")) as engine:
        out = await engine.generate(prompt, params)
        assert engine._runner.lean.dtype == torch.bfloat16
    assert len(out.token_ids) == 3


async def test_backpressure_bounds_pending_admissions(make_model, tokenizer):
    model, ref = make_model("llama")
    prompts = random_prompts(12, [4, 7], len(tokenizer), seed=3)
    config = EngineConfig(max_num_seqs=2, max_pending=2)
    async with Engine(model, tokenizer, config) as engine:
        tasks = [
            asyncio.create_task(engine.generate(p, SamplingParams(max_new_tokens=6, ignore_eos=True))) for p in prompts
        ]
        peak = 0
        while not all(t.done() for t in tasks):
            s = engine.stats()
            assert s.num_running <= 2
            peak = max(peak, s.num_waiting - len(engine._scheduler.waiting))
            await asyncio.sleep(0.001)
        outs = [t.result() for t in tasks]
    assert peak <= 2
    assert [o.token_ids for o in outs] == [reference_greedy(ref, p, 6) for p in prompts]


async def test_close_releases_submitters_blocked_on_backpressure(make_model, tokenizer):
    model, _ = make_model("llama")
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=1, max_pending=1, drain_timeout=0))
    await engine.start()
    params = SamplingParams(max_new_tokens=2000 // 10, ignore_eos=True)
    tasks = [asyncio.create_task(engine.generate(f"p{i}", params)) for i in range(5)]
    await asyncio.sleep(0.05)
    await asyncio.wait_for(engine.close(), 5)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(r, EngineClosedError) or r.finish_reason == "length" for r in results)


async def test_a_closed_engine_lets_go_of_its_kv_cache_so_the_next_engine_on_the_model_gets_the_memory(
    make_model, tokenizer
):
    """The lean model stays on the model for the next engine; it must not keep a closed engine's cache alive (a
    second engine would size its cache from the memory left over, and preempt)."""
    import gc
    import weakref

    model, ref = make_model("llama")
    config = EngineConfig(fast_path=True, block_size=8, num_kv_blocks=64)
    engine = Engine(model, tokenizer, config)
    cache = weakref.ref(model._acb_lean.kv_cache)
    async with engine:
        await engine.generate([5, 6, 7], SamplingParams(max_new_tokens=3))
    assert model._acb_lean.kv_cache is None
    del engine
    gc.collect()
    assert cache() is None  # freed, not held by the model
    prompt = random_prompts(1, [9], len(tokenizer), seed=1)[0]
    async with Engine(model, tokenizer, config) as again:  # the next engine on the same model still works
        out = await again.generate(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, prompt, 6)


async def test_a_second_open_engine_on_the_same_model_is_refused_with_a_typed_error(make_model, tokenizer):
    from acb import ModelInUseError

    model, _ = make_model("llama")
    config = EngineConfig(fast_path=True, block_size=8, num_kv_blocks=32)
    async with Engine(model, tokenizer, config) as first:
        with pytest.raises(ModelInUseError, match="close it first"):
            Engine(model, tokenizer, config)
        out = await first.generate([5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True))  # unharmed
        assert len(out.token_ids) == 3
    never_started = Engine(model, tokenizer, config)  # closed: the model is free again
    await never_started.close()  # closing an engine that never started frees the model too
    kept = Engine(model, tokenizer, config)
    del kept
    Engine(model, tokenizer, config)  # and an engine dropped without closing does not hold it either


async def test_warm_up_runs_before_start_returns_and_leaves_nothing_behind(make_model, tokenizer):
    """EngineConfig(warmup=True) (the default on CUDA): internal requests run inside start(); afterwards the counters
    are zero, the prefix cache holds nothing, every block is free, and requests get transformers' tokens."""
    model, ref = make_model("llama", seed=3)
    prompt = random_prompts(1, [11], len(tokenizer), seed=2)[0]
    config = EngineConfig(block_size=8, warmup=True, prefix_caching=True, max_num_batched_tokens=48)
    async with Engine(model, tokenizer, config) as engine:
        assert engine.startup["warmup_s"] > 0 and set(engine.startup) >= {"lean_model_s", "runner_s"}
        assert engine.startup["warmup_requests_s"] > 0 and "warmup_gemms_s" in engine.startup  # each phase's time
        stats = engine.stats()
        assert (stats.steps, stats.prefix_queries, stats.prefix_cached_blocks, stats.num_preemptions) == (0, 0, 0, 0)
        assert stats.kv_blocks_free == stats.kv_blocks_total
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, prompt, 8)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        assert "warmup_s" not in engine.startup  # off by default on the CPU


async def test_a_warm_up_that_fails_leaves_nothing_running(make_model, tokenizer):
    """start() fails as a whole: no pipeline task is left, and the model is free for the next engine."""
    model, ref = make_model("llama", seed=4)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, warmup=True))

    async def broken():
        raise MemoryError("out of memory in the warm-up's largest step")

    engine._warm_up = broken
    with pytest.raises(MemoryError):
        await engine.start()
    assert engine.state == "closed"
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("acb-")]
    prompt = random_prompts(1, [7], len(tokenizer), seed=1)[0]
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as again:  # no ModelInUseError
        out = await again.generate(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, prompt, 5)


async def test_a_cache_too_small_for_the_warm_up_skips_it(make_model, tokenizer):
    model, ref = make_model("llama", seed=4)
    prompt = random_prompts(1, [1], len(tokenizer), seed=1)[0]  # a 2-token cache: one token in, one out
    async with Engine(model, tokenizer, EngineConfig(block_size=1, num_kv_blocks=2, warmup=True)) as engine:
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
        assert engine.stats().steps == 1
    assert out.token_ids == reference_greedy(ref, prompt, 1)


@pytest.mark.parametrize(
    "fields, max_model_len, kv_tokens, lengths",
    [
        (dict(max_num_batched_tokens=8192), 336, 10**6, [334] * 24 + [176]),  # W-side's engine: one full step
        (dict(max_num_batched_tokens=64), 4096, 10**6, [64]),
        (dict(max_num_batched_tokens=8192, max_num_seqs=4), 100, 10**6, [98] * 4),
        (dict(max_num_batched_tokens=8192), 4096, 100, [50]),  # half the cache at most
        (dict(), 2, 10**6, None),  # nothing fits: no warm-up
        (dict(), 4096, 1, None),
    ],
)
def test_the_warm_up_plan_fills_the_largest_step_within_every_limit(fields, max_model_len, kv_tokens, lengths):
    from acb import warmup

    groups = warmup.plan(EngineConfig(**fields), max_model_len, kv_tokens, vocab=1000)
    if lengths is None:
        assert groups == []
        return
    largest, short = groups
    assert [len(ids) for ids, _ in largest] == lengths
    assert all(1 <= len(ids) <= 5 for ids, _ in short) and short[0][1].repetition_penalty == 1.1
    assert all(3 <= t < 1000 for group in groups for ids, _ in group for t in ids)


@pytest.mark.parametrize("group", [1, 4, 7, 8, 16, 32])
def test_the_warm_up_meets_the_prefill_kernels_small_tile(group):
    """A step whose prompts have at most 16 rows of tokens times query heads per KV head runs the prefill kernel's
    16-row tile: the warm-up's short prompts make one (where any can), or the first real one would compile it."""
    from acb import warmup

    _, short = warmup.plan(EngineConfig(max_num_batched_tokens=8192), 4096, 10**6, vocab=1000, group=group)
    assert max(len(ids) for ids, _ in short) * group <= 16 or (group > 16 and all(len(ids) == 1 for ids, _ in short))


async def test_a_cancelled_close_still_stops_the_engine_and_gives_the_model_back(make_model, tokenizer):
    """Only the drain of ``close()`` is cancellable: a timeout around it (or Ctrl-C) while a request runs still
    fails what is left, stops the pipeline and frees the model, so that a later engine on it starts."""
    model, ref = make_model("llama", seed=3)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    await engine.start()
    task = asyncio.create_task(engine.generate([5, 6, 7], SamplingParams(max_new_tokens=2000, ignore_eos=True)))
    while engine.stats().num_running == 0:
        await asyncio.sleep(0.005)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await engine.close()
    assert engine.state == "closed" and all(t.done() for t in engine._tasks)
    with pytest.raises(EngineClosedError):
        await task
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
    async with Engine(model, tokenizer) as again:  # the model was given back: no ModelInUseError
        out = await again.generate([5, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, [5, 6, 7], 4)


def test_an_engine_whose_event_loop_ended_unclosed_refuses_with_a_typed_error_then_closes_and_starts_again(
    make_model, tokenizer
):
    """An engine started under one ``asyncio.run()`` that ended without closing it: a request from a later loop is
    refused with EngineClosedError (nothing of it is kept), ``close()`` from that loop tears the engine down and
    gives the model back, and the engine starts again there."""
    model, ref = make_model("llama", seed=5)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    asyncio.run(engine.start())
    want = reference_greedy(ref, [4, 5, 6], 5)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    async def later():
        with pytest.raises(EngineClosedError, match="event loop this engine was started on has ended"):
            await engine.generate([4, 5, 6], params)
        assert not engine._live and engine.state == "running"
        await engine.close()
        assert engine.state == "closed"
        async with engine:
            return (await engine.generate([4, 5, 6], params)).token_ids

    assert asyncio.run(later()) == want
    assert engine.state == "closed"

    async def next_engine():  # the model is free again
        async with Engine(model, tokenizer) as again:
            return (await again.generate([4, 5, 6], params)).token_ids

    assert asyncio.run(next_engine()) == want


@pytest.mark.loops("asyncio")
async def test_a_timeout_during_the_teardown_of_close_or_the_build_of_a_restart_still_completes_them(
    make_model, tokenizer
):
    """asyncio's own cancellation (a timeout around the call) goes through anyio's shields: landing while close()
    waits for a running step, it left the engine "closed" with its runner open and the model held; landing while
    a restart builds, it left the build to finish in its thread and claim the model, the engine saying "closed".
    Both now run to their end, and the cancellation is raised after."""
    import time

    model, ref = make_model("llama", seed=3)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    await engine.start()
    runner, step = engine._runner, engine._runner._execute_step

    def slow_step(batch):  # a step that takes a while (a long prefill on the card)
        time.sleep(0.4)
        return step(batch)

    runner._execute_step = slow_step
    task = asyncio.create_task(engine.generate([5, 6, 7], SamplingParams(max_new_tokens=50, ignore_eos=True)))
    await asyncio.sleep(0.1)  # the step runs in the worker
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await engine.close(drain=False)  # the timeout lands while close() waits for the step
    assert engine.state == "closed" and runner.closed
    assert model.config._attn_implementation != "acb_paged"  # the model was given back
    with pytest.raises(EngineClosedError):
        await task

    build = engine._build

    def slow_build():
        time.sleep(0.3)
        build()

    engine._build = slow_build
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await engine.start()  # the timeout lands while the restart builds
    assert engine.state == "closed" and engine._runner.closed
    async with Engine(model, tokenizer) as again:  # nothing holds the model
        out = await again.generate([5, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, [5, 6, 7], 4)
