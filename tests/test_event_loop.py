"""The event loop stays responsive: no step, however slow, blocks it."""

from __future__ import annotations

import asyncio
import time

from conftest import encode_spy

from acb import Engine, EngineConfig, SamplingParams


async def _heartbeat(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)


async def test_a_200ms_forward_never_delays_a_1ms_heartbeat(make_model, tokenizer):
    model, _ = make_model("llama")
    forward = model.forward
    slow_steps = []

    def slow(*args, **kwargs):
        time.sleep(0.2)  # a test double for a heavy model: the step holds its thread for 200 ms
        slow_steps.append(1)
        return forward(*args, **kwargs)

    model.forward = slow
    lags: list[float] = []
    stop = asyncio.Event()
    async with Engine(model, tokenizer, EngineConfig(overlap=True)) as engine:
        beat = asyncio.create_task(_heartbeat(lags, stop))
        outs = await asyncio.gather(
            *(engine.generate(f"prompt {i}", SamplingParams(max_new_tokens=4, ignore_eos=True)) for i in range(3))
        )
        stop.set()
        await beat
    assert all(o.finish_reason == "length" for o in outs)
    assert len(slow_steps) >= 4
    assert len(lags) > 100  # the heartbeat kept beating through ~1 s of steps
    assert max(lags) < 0.05, f"worst heartbeat lag {max(lags) * 1e3:.1f} ms"


async def test_long_prompts_are_tokenized_off_the_loop(make_model, tokenizer, monkeypatch):
    model, _ = make_model("llama")
    seen, spy = encode_spy(tokenizer)

    async with Engine(model, tokenizer, EngineConfig(long_prompt_chars=100, max_model_len=2048)) as engine:
        monkeypatch.setattr(engine._admission.tokenizer, "encode", spy)
        await engine.generate("short", SamplingParams(max_new_tokens=1))
        await engine.generate("long " * 60, SamplingParams(max_new_tokens=1))
    assert seen == [True, False]


async def test_the_loop_matrix_is_real(request):
    """Each async test runs once per loop; make sure the uvloop leg really runs on uvloop."""
    loop = type(asyncio.get_running_loop())
    leg = request.node.callspec.id
    assert ("uvloop" in loop.__module__) == (leg == "uvloop"), (leg, loop)
