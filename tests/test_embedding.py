"""Embedding acb in an application: the model stays the caller's, errors arrive before any byte, an engine can
start again, dtypes are written as torch users write them."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import reference_greedy

from acb import Engine, EngineConfig, InvalidPromptError, ModelInUseError, SamplingParams
from acb.default_model import tiny_model

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("fast_path", [True, False], ids=["lean", "generic"])
async def test_the_model_is_given_back_as_it_was(fast_path, tokenizer):
    model = tiny_model("llama", seed=61)
    prompt = [5, 9, 14, 3, 8]
    before = reference_greedy(model, prompt, 8)
    params = dict(model.named_parameters())
    memory = sum(p.numel() for p in model.parameters())
    async with Engine(model, tokenizer, EngineConfig(fast_path=fast_path)) as engine:
        assert (await engine.generate(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))).token_ids == before
    assert reference_greedy(model, prompt, 8) == before  # model.generate works again, with the same output
    assert sum(p.numel() for p in model.parameters()) == memory  # fused weights are views: nothing stored twice
    if fast_path:
        lean = model._acb_lean
        q = model.model.layers[0].self_attn.q_proj.weight
        assert q.untyped_storage().data_ptr() == lean.layers[0].qkv_w.untyped_storage().data_ptr()
    assert set(dict(model.named_parameters())) == set(params)


async def test_an_engine_starts_again_after_it_closed(make_model, tokenizer):
    model, ref = make_model("qwen2", seed=63)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    want = reference_greedy(ref, [4, 5, 6], 6)
    for _ in range(3):
        async with engine:
            assert (await engine.generate([4, 5, 6], PARAMS)).token_ids == want
            assert engine.running
        assert engine.state == "closed" and not engine.running
    with pytest.raises(ModelInUseError):  # one open engine per model, on any path
        async with engine, Engine(model, tokenizer, EngineConfig(fast_path=False)):
            pass


async def test_submit_raises_before_any_stream_exists(make_model, tokenizer):
    model, ref = make_model("llama", seed=65)
    async with Engine(model, tokenizer) as engine:
        with pytest.raises(InvalidPromptError):
            await engine.submit("")
        with pytest.raises(InvalidPromptError):
            await engine.submit([1, 10**7])
        stream = await engine.submit([7, 8, 9], PARAMS)
        assert engine.stats().num_running + engine.stats().num_waiting == 1  # queued before any iteration
        assert [t.id async for t in stream] == reference_greedy(ref, [7, 8, 9], 6)
        dropped = await engine.submit([7, 8, 9], SamplingParams(max_new_tokens=500, ignore_eos=True))
        del dropped  # never read: the request ends when the stream is dropped
        assert engine.stats().num_running + engine.stats().num_waiting == 0


@pytest.mark.parametrize("dtype, name", [(torch.float32, "float32"), ("fp32", "float32"), ("bf16", "bfloat16"),
                                         ("torch.float16", "float16"), ("half", "float16")])  # fmt: skip
def test_dtypes_as_torch_users_write_them(dtype, name):
    assert EngineConfig(dtype=dtype).dtype == name


@pytest.mark.parametrize("dtype", ["int8", torch.int64, 3])
def test_a_bad_dtype_is_a_clear_error(dtype):
    with pytest.raises(ValueError, match="dtype must be"):
        EngineConfig(dtype=dtype)


@pytest.mark.parametrize("dtype", ["bf16", torch.bfloat16, "auto", None])
async def test_from_pretrained_takes_every_dtype_spelling(tmp_path, tokenizer, dtype):
    model = tiny_model("llama", seed=67)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(str(tmp_path), dtype=dtype, device="cpu", trust_remote_code=False)
    want = torch.bfloat16 if dtype in ("bf16", torch.bfloat16) else torch.float32
    assert engine.dtype == want
    async with engine:
        assert (await engine.generate("hello", PARAMS)).finish_reason == "length"


async def test_a_restart_builds_in_a_worker_thread_while_the_loop_serves(make_model, tokenizer, monkeypatch):
    """A closed engine's ``start()`` builds it anew (on CUDA: the KV cache and the decode graphs' capture) in a
    worker thread: the loop keeps running other tasks meanwhile, the engine says ``"starting"``, a ``close()`` then
    waits for the build and gives the model back, and a second ``start()`` is refused."""
    import threading
    import time

    from acb import EngineClosedError

    model, ref = make_model("llama", seed=69)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    async with engine:
        pass
    build, threads = engine._build, []

    def slow_build():
        threads.append(threading.current_thread())
        time.sleep(0.3)  # a long build: a blocking one would stop the ticks below
        build()

    monkeypatch.setattr(engine, "_build", slow_build)
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        starting = asyncio.create_task(engine.start())
        await asyncio.sleep(0.05)
        assert engine.state == "starting" and not engine.running
        with pytest.raises(EngineClosedError, match="starting"):
            await engine.start()
        await starting
        assert threads and threads[0] is not threading.main_thread() and ticks >= 10
        assert (await engine.generate([4, 5, 6], PARAMS)).token_ids == reference_greedy(ref, [4, 5, 6], 6)
        await engine.close()
        starting = asyncio.create_task(engine.start())
        await asyncio.sleep(0.05)
        await engine.close()  # during the build: waits for it, then closes what it built
        await starting
        assert engine.state == "closed"
    finally:
        ticker.cancel()
    async with Engine(model, tokenizer):  # the model was given back
        pass
