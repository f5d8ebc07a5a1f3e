"""Penalties, logit_bias, min_tokens and top logprobs: against transformers' logits processors and a log-softmax
reference, on the same weights; through both overlap modes, multi-step rounds and mixed batches."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import break_preparation_of, random_prompts, reference_greedy
from transformers import (
    LogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from acb import Engine, EngineConfig, SamplingParams
from acb.errors import InvalidSamplingParamsError
from acb.logits import LogitsState, SlotSetup, StepProcessing

EOS = 2


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's documented formula: logit - count * frequency_penalty - (count > 0) * presence_penalty, counting the
    output only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _processing(rows, slots, params: list[SamplingParams]) -> StepProcessing:
    import numpy as np

    floats = np.array([[p.presence_penalty, p.frequency_penalty, p.repetition_penalty] for p in params], np.float32).T
    mins = [p.min_tokens for p in params]
    return StepProcessing(
        ints=np.array([rows, slots, mins], np.int64),
        floats=np.ascontiguousarray(floats),
        use_counts=bool(floats[:2].any()),
        use_repetition=bool((floats[2] != 1).any()),
        use_bias=any(p.logit_bias for p in params),
        use_min_tokens=any(mins),
    )


def test_the_processing_pass_matches_transformers_processors_on_the_same_logits():
    vocab, g = 64, torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 12, 5)]
    outputs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 2, 0)]
    params = [
        SamplingParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(logit_bias={5: 3.5, 9: -100, 60: 1.25}, min_tokens=4, stop_token_ids=[7]),
        SamplingParams(repetition_penalty=0.6, min_tokens=1),
    ]
    state = LogitsState(num_slots=8, vocab_size=vocab, device=torch.device("cpu"))
    slots = [5, 0, 3]
    state.setup(
        [
            SlotSetup(slot, out, prompt if p.repetition_penalty != 1 else None, p.logit_bias,
                      [EOS, *p.stop_token_ids] if p.min_tokens else None)
            for slot, prompt, out, p in zip(slots, prompts, outputs, params)
        ]
    )  # fmt: skip
    logits = torch.randn(4, vocab, generator=g) * 3  # row 0 is a plain row sharing the step: untouched
    got = state.apply(logits.clone(), _processing([1, 2, 3], slots, params))
    assert torch.equal(got[0], logits[0])
    for row, prompt, out, p in zip((1, 2, 3), prompts, outputs, params):
        ids = torch.tensor([prompt + out])
        want = logits[row : row + 1].clone()
        if p.repetition_penalty != 1:
            want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, want)
        want = OpenAIPenalties(len(prompt), p.presence_penalty, p.frequency_penalty)(ids, want)
        if p.logit_bias:
            want = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias})(ids, want)
        if p.min_tokens:
            stoppers = [EOS, *p.stop_token_ids]
            want = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, stoppers)(ids, want)
        torch.testing.assert_close(got[row : row + 1], want, rtol=1e-6, atol=1e-5)


def test_sampled_tokens_advance_the_history_on_the_device():
    vocab = 16
    state = LogitsState(num_slots=4, vocab_size=vocab, device=torch.device("cpu"))
    p = SamplingParams(frequency_penalty=1.0)
    state.setup([SlotSetup(2, [4, 4], None, None, None)])
    proc = _processing([0], [2], [p])
    state.record(torch.tensor([4]), proc)
    state.record(torch.tensor([-1]), proc)  # a failed row counts as token 0, never as an index error
    assert state.counts[2, 4] == 3 and state.out_len[2] == 4
    out = state.apply(torch.zeros(1, vocab), proc)
    assert out[0, 4] == -3.0 and out[0, 5] == 0.0


def _reference(ref, prompt: list[int], n: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n,
            do_sample=False, pad_token_id=0, **kwargs,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


CASES = {
    "repetition": (dict(repetition_penalty=1.8), lambda p: dict(repetition_penalty=1.8)),
    "presence+frequency": (
        dict(presence_penalty=1.5, frequency_penalty=0.75),
        lambda p: dict(logits_processor=[OpenAIPenalties(len(p), 1.5, 0.75)]),
    ),
    "logit_bias": (
        dict(logit_bias={10: 4.0, 11: 3.0, 12: -100.0}),
        lambda p: dict(sequence_bias={(10,): 4.0, (11,): 3.0, (12,): -100.0}),
    ),
}


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("decode_steps", [1, 4], ids=["single", "rounds"])
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("path", ["generic", "lean"])
async def test_penalized_greedy_matches_generate_in_a_mixed_batch(path, overlap, decode_steps, make_model, tokenizer):
    model, ref = make_model("llama", seed=5)
    prompts = random_prompts(8, [6, 19, 33, 4], len(tokenizer), seed=5)
    kinds = [None, *CASES, None, *CASES, None]
    expected = []
    for p, kind in zip(prompts, kinds):
        extra = {} if kind is None else CASES[kind][1](p)
        expected.append(_reference(ref, p, 16, eos_token_id=None, min_new_tokens=16, **extra))
    config = EngineConfig(block_size=8, max_num_batched_tokens=48, overlap=overlap, decode_steps=decode_steps,
                          fast_path=path == "lean")  # fmt: skip
    async with Engine(model, tokenizer, config) as engine:

        async def one(i, p, kind):
            await asyncio.sleep(0.003 * i)  # staggered: rows join a running batch and take used slots
            extra = {} if kind is None else CASES[kind][0]
            return await engine.generate(p, SamplingParams(max_new_tokens=16, ignore_eos=True, **extra))

        outs = await asyncio.gather(*(one(i, p, k) for i, (p, k) in enumerate(zip(prompts, kinds))))
        stats = engine.stats()
    for out, exp, kind in zip(outs, expected, kinds):
        assert out.token_ids == exp, kind
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_min_tokens_holds_back_eos_like_min_new_tokens(overlap, make_model, tokenizer):
    model, ref = make_model("llama", seed=6)
    prompt = random_prompts(1, [11], len(tokenizer), seed=6)[0]
    bias = {EOS: 100.0}  # EOS wins wherever it is allowed
    expected = _reference(ref, prompt, 20, eos_token_id=EOS, min_new_tokens=5, sequence_bias={(EOS,): 100.0})
    assert len(expected) == 6 and expected[-1] == EOS
    async with Engine(model, tokenizer, EngineConfig(block_size=8, overlap=overlap)) as engine:
        held = await engine.generate(prompt, SamplingParams(max_new_tokens=20, min_tokens=5, logit_bias=bias))
        free = await engine.generate(prompt, SamplingParams(max_new_tokens=20, logit_bias=bias))
    assert held.token_ids == expected and held.finish_reason == "stop"
    assert free.token_ids == [EOS]


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("decode_steps", [1, 3], ids=["single", "rounds"])
async def test_top_logprobs_match_a_log_softmax_reference(decode_steps, make_model, tokenizer):
    model, ref = make_model("llama", seed=7)
    prompts = random_prompts(3, [9, 20, 4], len(tokenizer), seed=7)
    config = EngineConfig(block_size=8, decode_steps=decode_steps)
    async with Engine(model, tokenizer, config) as engine:
        outs = await asyncio.gather(
            engine.generate(prompts[0], SamplingParams(max_new_tokens=10, ignore_eos=True, top_logprobs=5)),
            engine.generate(prompts[1], SamplingParams(max_new_tokens=10, ignore_eos=True, top_logprobs=2)),
            engine.generate(prompts[2], SamplingParams(max_new_tokens=10, ignore_eos=True)),
        )
        stream_tops = [t.top_logprobs async for t in engine.stream(prompts[0], SamplingParams(
            max_new_tokens=10, ignore_eos=True, top_logprobs=5))]  # fmt: skip
    for out, prompt, k in zip(outs[:2], prompts, (5, 2)):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
        dist = logits.float().log_softmax(-1)
        values, ids = dist.topk(k, dim=-1)
        assert out.logprobs is not None and len(out.top_logprobs) == len(out.token_ids) == 10
        for j, alts in enumerate(out.top_logprobs):
            assert [a[0] for a in alts] == ids[j].tolist()
            torch.testing.assert_close(torch.tensor([a[1] for a in alts]), values[j], atol=1e-4, rtol=1e-4)
            assert out.logprobs[j] == pytest.approx(dist[j, out.token_ids[j]].item(), abs=1e-4)
    assert outs[2].top_logprobs is None and outs[2].logprobs is None
    assert [[a[0] for a in t] for t in stream_tops] == [[a[0] for a in t] for t in outs[0].top_logprobs]
    alone = torch.tensor([[a[1] for a in t] for t in stream_tops])  # the same, in another batch (float noise)
    torch.testing.assert_close(alone, torch.tensor([[a[1] for a in t] for t in outs[0].top_logprobs]))


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=1e-46), "repetition_penalty"),  # 0 in float32: the logits would overflow
        (dict(repetition_penalty=5e-7), "repetition_penalty"),
        (dict(repetition_penalty="1.2"), "repetition_penalty"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_new_tokens=4), "min_tokens"),
        (dict(logit_bias={3: 101}), "logit_bias"),
        (dict(logit_bias={"x": 1}), "logit_bias"),
        (dict(logit_bias={"²": 1}), "logit_bias"),  # str.isdigit() takes it, int() does not
        (dict(logit_bias={"٣": 1}), "logit_bias"),  # an Arabic-Indic 3, which int() would read as token 3
        (dict(logit_bias={"-3": 1}), "logit_bias"),
        (dict(logit_bias={"9" * 5000: 1}), "logit_bias"),  # more digits than int() parses
        (dict(max_new_tokens=2**31), "max_new_tokens"),
        (dict(max_new_tokens=2**63, min_tokens=2**63), "max_new_tokens"),  # min_tokens overflowed the batch builder
        (dict(logit_bias={3: True}), "logit_bias"),
        (dict(logit_bias=[1, 2]), "logit_bias"),
        (dict(logit_bias={i: 1.0 for i in range(1025)}), "logit_bias"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(top_logprobs=True), "top_logprobs"),
        (dict(n=65), "n"),
        (dict(n=3, best_of=2), "best_of"),
    ],
)
def test_out_of_range_processing_parameters_are_typed_errors(fields, param):
    with pytest.raises(InvalidSamplingParamsError) as err:
        SamplingParams(**fields)
    assert err.value.param == param


@pytest.mark.loops("asyncio")
async def test_a_bias_outside_the_vocabulary_is_refused_and_others_are_served(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        with pytest.raises(InvalidSamplingParamsError, match="outside the vocabulary") as err:
            await engine.submit([5, 6], SamplingParams(logit_bias={len(tokenizer) + 3: 1.0}))
        assert err.value.param == "logit_bias"
        with pytest.raises(InvalidSamplingParamsError, match="generate_choices"):
            await engine.generate([5, 6], SamplingParams(n=2))
        out = await engine.generate([5, 6], SamplingParams(max_new_tokens=3, ignore_eos=True, presence_penalty=1))
        assert len(out.token_ids) == 3


@pytest.mark.loops("asyncio")
async def test_a_cancelled_penalized_request_frees_its_blocks_and_its_slot_serves_the_next(make_model, tokenizer):
    model, ref = make_model("llama", seed=8)
    prompt = random_prompts(1, [30], len(tokenizer), seed=8)[0]
    expected = _reference(ref, prompt, 8, eos_token_id=None, min_new_tokens=8)
    async with Engine(model, tokenizer, EngineConfig(block_size=8, max_num_seqs=1)) as engine:
        params = SamplingParams(max_new_tokens=200, ignore_eos=True, frequency_penalty=2.0, logit_bias={9: 50.0})
        async with engine.stream(prompt, params) as s:
            async for _ in s:
                break
        plain = await engine.generate(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))  # same slot
        stats = engine.stats()
    assert plain.token_ids == expected  # nothing of the penalized request's history leaked into the slot
    assert stats.kv_blocks_free == stats.kv_blocks_total


_KERNEL_CHECK = """
import torch
from acb.config import SamplingParams
from acb.logits import LogitsState, SlotSetup
from test_logits_processing import _processing

vocab, g = 3000, torch.Generator().manual_seed(4)
params = [
    SamplingParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=-0.25),
    SamplingParams(logit_bias={5: 3.5, 9: -100, 2999: 1.25}, min_tokens=4, stop_token_ids=[7]),
    SamplingParams(repetition_penalty=0.6, min_tokens=1, frequency_penalty=2.0),
]
slots = [5, 0, 3]
setups = [SlotSetup(s, torch.randint(0, vocab, (n,), generator=g).tolist(),
                    torch.randint(0, vocab, (9,), generator=g).tolist() if p.repetition_penalty != 1 else None,
                    p.logit_bias, [2, *p.stop_token_ids] if p.min_tokens else None)
          for s, n, p in zip(slots, (40, 2, 0), params)]
logits = torch.randn(5, vocab, generator=g) * 4
out = []
for fused in (False, True):
    state = LogitsState(num_slots=8, vocab_size=vocab, device=torch.device("cpu"), fused=fused)
    state.setup(setups)
    proc = _processing([1, 3, 4], slots, params)
    out.append(state.apply(logits.clone(), proc))
torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-5)
assert torch.equal(out[1][[0, 2]], logits[[0, 2]])
print("ok")
"""


def test_the_fused_kernel_equals_the_torch_pass():
    """The Triton kernel used on CUDA, run by Triton's interpreter on the CPU, against the torch version."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.loops("asyncio")
async def test_penalized_requests_survive_a_step_that_could_not_be_prepared(make_model, tokenizer, caplog):
    """A step that fails preparation is rebuilt row by row to find its culprit; those trial builds must not leave
    the innocent rows' slots looking set up (their penalty history never reached the device)."""
    import logging

    from acb.errors import RequestFailedError

    caplog.set_level(logging.CRITICAL, logger="acb")
    model, ref = make_model("llama", seed=9)
    prompts = random_prompts(4, [6, 15], len(tokenizer), seed=9)
    expected = [_reference(ref, p, 10, eos_token_id=None, min_new_tokens=10, repetition_penalty=1.9) for p in prompts]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=1.9)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        break_preparation_of(engine, "bad")
        results = await asyncio.gather(
            *(engine.generate(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)),
            engine.generate([5, 6], params, request_id="bad"),
            return_exceptions=True,
        )
    assert isinstance(results[-1], RequestFailedError)
    assert [r.token_ids for r in results[:-1]] == expected


@pytest.mark.loops("asyncio")
async def test_a_value_the_batch_builder_cannot_store_fails_its_request_only(make_model, tokenizer, caplog):
    """A request whose sampling values fail when the batch builder records them for its slot (here a ``min_tokens``
    beyond int64, which validation now refuses, forced past it) fails alone: the builder owns the slot only once
    every value is in, so the row-by-row rebuild finds the request instead of failing its whole step."""
    import dataclasses
    import logging

    from acb.errors import RequestFailedError

    caplog.set_level(logging.CRITICAL, logger="acb")
    model, ref = make_model("llama", seed=9)
    prompts = random_prompts(4, [6, 15], len(tokenizer), seed=9)
    expected = [reference_greedy(ref, p, 10) for p in prompts]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    bad = dataclasses.replace(params, min_tokens=1)
    object.__setattr__(bad, "min_tokens", 2**63)
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        results = await asyncio.gather(
            *(engine.generate(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)),
            engine.generate([5, 6], bad, request_id="bad"),
            return_exceptions=True,
        )
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
    assert isinstance(results[-1], RequestFailedError), results[-1]
    assert [r.token_ids for r in results[:-1]] == expected
