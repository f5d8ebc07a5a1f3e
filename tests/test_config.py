"""SamplingParams and EngineConfig: every field is type- and range-checked where it is written, and a request's
parameters cannot change after the engine checked them."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from acb import EngineConfig, InvalidConfigError, InvalidSamplingParamsError, SamplingParams
from acb.config import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TOP_K


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(top_k=2**63), "top_k"),
        (dict(top_k=MAX_TOP_K + 1), "top_k"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(temperature=10**400), "temperature"),  # an int beyond float range
        (dict(temperature=1e39), "temperature"),  # beyond float32: the device tensor would hold inf
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature="1"), "temperature"),
        (dict(temperature=None), "temperature"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=10**400), "top_p"),
        (dict(top_p=None), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(max_new_tokens=3.0), "max_new_tokens"),
        (dict(seed="1"), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(logprobs=None), "logprobs"),
        (dict(logprobs=1), "logprobs"),
        (dict(ignore_eos="yes"), "ignore_eos"),
        (dict(stop=None), "stop"),
        (dict(stop=5), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["ok", 3]), "stop"),
        (dict(stop={"a": 1}), "stop"),
        (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop"),
        (dict(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "stop"),
        (dict(stop_token_ids=None), "stop_token_ids"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=[1.0]), "stop_token_ids"),
        (dict(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids"),
    ],
)
def test_every_field_is_typed_and_bounded(fields, param):
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**fields)
    assert info.value.param == param


def test_limits_themselves_are_accepted_and_normalized():
    p = SamplingParams(
        temperature=2,  # an int is a number
        top_k=MAX_TOP_K,
        stop=["s" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS,
        stop_token_ids=[0] * MAX_STOP_TOKEN_IDS,
        seed=-(2**80),
    )
    assert p.temperature == 2.0 and isinstance(p.temperature, float)
    assert isinstance(p.stop, tuple) and isinstance(p.stop_token_ids, tuple)
    assert SamplingParams(stop="one").stop == ("one",)


def test_params_cannot_change_after_construction():
    stops, ids = ["a"], [1]
    p = SamplingParams(max_new_tokens=5, stop=stops, stop_token_ids=ids)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_new_tokens = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 2**63
    stops.append("b")  # the caller's lists are copied, not shared
    ids.append(2)
    assert p.stop == ("a",) and p.stop_token_ids == (1,)
    with pytest.raises(InvalidSamplingParamsError):
        dataclasses.replace(p, max_new_tokens=0)  # a modified copy is validated again


@pytest.mark.parametrize(
    "fields",
    [
        dict(max_prompt_chars=0),
        dict(max_prompt_chars=1.5),
        dict(long_prompt_chars=0),
        dict(drain_timeout=-1),
        dict(prefill_chunk_tokens=0),
        dict(prefill_chunk_tokens=64.0),
        dict(prefill_chunk_tokens=True),
        dict(mixed_graphs="yes"),
        dict(drain_timeout=float("nan")),
        dict(drain_timeout="5"),
        dict(fast_path="false"),  # a truthy string used to turn the lean path on
        dict(overlap="no"),
        dict(cuda_graphs=1),
        dict(record_step_timing="yes"),
        dict(device="meta"),  # used to move the model there: its weights gone
        dict(device="tpu"),
        dict(device="cuda:x"),
        dict(device=123),
    ],
)
def test_engine_config_limits_are_checked(fields):
    with pytest.raises(InvalidConfigError):
        EngineConfig(**fields)


def test_a_torch_device_is_stored_by_its_name():
    import torch

    assert EngineConfig(device=torch.device("cuda", 1)).device == "cuda:1"
    assert EngineConfig(device=torch.device("cpu")).device == "cpu"


def test_an_infinite_drain_timeout_means_wait():
    assert EngineConfig(drain_timeout=float("inf")).drain_timeout == float("inf")


# Every numeric field: (name, None allowed, +inf allowed, an integer field).
ENGINE_NUMBERS = [
    ("block_size", False, False, True), ("num_kv_blocks", True, False, True),
    ("kv_memory_fraction", False, False, False), ("max_num_seqs", False, False, True),
    ("max_num_batched_tokens", False, False, True), ("prefill_chunk_tokens", True, False, True),
    ("max_model_len", True, False, True), ("admission_group", True, False, True),
    ("admission_max_delay", False, False, True), ("max_pending", False, False, True),
    ("overlap_depth", False, False, True), ("decode_steps", False, False, True),
    ("tensor_parallel_size", False, False, True), ("long_prompt_chars", False, False, True),
    ("max_prompt_chars", True, False, True), ("drain_timeout", False, True, False),
]  # fmt: skip
SAMPLING_NUMBERS = [
    ("max_new_tokens", False, False, True), ("temperature", False, False, False), ("top_k", False, False, True),
    ("top_p", False, False, False), ("seed", True, False, True), ("top_logprobs", False, False, True),
    ("presence_penalty", False, False, False), ("frequency_penalty", False, False, False),
    ("repetition_penalty", False, False, False), ("min_tokens", False, False, True), ("n", False, False, True),
    ("best_of", True, False, True),
]  # fmt: skip


def _wrong(numbers) -> list:
    out = []
    for name, none_ok, inf_ok, integer in numbers:
        wrong = ["1", "0.5", True, False, math.nan, -math.inf, [1]]
        wrong += [] if none_ok else [None]
        wrong += [] if inf_ok else [math.inf]
        wrong += [1.5, 2.0] if integer else []
        out += [pytest.param(name, v, id=f"{name}={v!r}") for v in wrong]
    return out


def test_max_model_len_needs_two_positions():
    """One position holds no prompt and its first generated token: every request would be refused."""
    with pytest.raises(InvalidConfigError, match="max_model_len must be an integer >= 2"):
        EngineConfig(max_model_len=1)
    assert EngineConfig(max_model_len=2).max_model_len == 2


@pytest.mark.parametrize("name, value", _wrong(ENGINE_NUMBERS))
def test_every_numeric_engine_config_field_refuses_wrong_types_typed(name, value):
    """A string used to reach a comparison in ``__post_init__`` (``kv_memory_fraction="0.5"``: an untyped
    TypeError) and a bool passed as a number (``drain_timeout=True``, ``admission_max_delay=True``)."""
    with pytest.raises(InvalidConfigError, match=name):
        EngineConfig(**{name: value})


@pytest.mark.parametrize("name, value", _wrong(SAMPLING_NUMBERS))
def test_every_numeric_sampling_field_refuses_wrong_types_typed(name, value):
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**{name: value})
    assert info.value.param == name


@pytest.mark.parametrize("cls, numbers", [(EngineConfig, ENGINE_NUMBERS), (SamplingParams, SAMPLING_NUMBERS)])
def test_the_lists_above_cover_every_numeric_field(cls, numbers):
    numeric = {f.name for f in dataclasses.fields(cls) if f.type.split(" | ")[0] in ("int", "float")}
    assert numeric == {n[0] for n in numbers}


@pytest.mark.parametrize("fields, words", [
    (dict(block_size=100_000_000), "one KV block"),  # the automatic sizing forced one block past the budget
    (dict(num_kv_blocks=10**12), "do not fit in cpu memory"),
])  # fmt: skip
def test_sizes_the_memory_cannot_hold_are_a_typed_error_and_leave_the_model(fields, words, make_model, tokenizer):
    """Sizes past what the host can allocate fail the engine's construction with InvalidConfigError (they were
    allocator tracebacks of several kinds), and the model still works for the next engine."""
    from conftest import reference_greedy

    from acb import Engine

    model, ref = make_model("llama", seed=3)
    with pytest.raises(InvalidConfigError, match=words):
        Engine(model, tokenizer, EngineConfig(**fields))
    assert reference_greedy(model, [4, 5], 3) == reference_greedy(ref, [4, 5], 3)
    asyncio.run(Engine(model, tokenizer).close())  # the model is free: a new engine builds on it
