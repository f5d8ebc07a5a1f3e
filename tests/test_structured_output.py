"""Structured output: what a constrained request produces parses and validates, even on a random-weight model;
constrained rows share batches with unconstrained ones, which still match ``model.generate``."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import pytest
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineConfig, SamplingParams
from acb.errors import InvalidSamplingParamsError
from acb.grammar import GrammarMasks

SCHEMAS = {
    "nested object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 10}, "id": {"type": "integer", "minimum": 1,
                                                                               "maximum": 999}},
                "required": ["name", "id"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "array of enums": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1,
                                "maxItems": 4}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["score", "count"],
        "additionalProperties": False,
    },
    "array of objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"type": "string", "enum": ["a", "b"]}, "v": {"type": ["integer", "null"],
                                                                            "maximum": 100, "minimum": 0}},
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
}  # fmt: skip


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_constrained_json_parses_and_validates_on_a_random_model(overlap, make_model, tokenizer):
    model, _ = make_model("llama", seed=11)
    prompts = ["Give me JSON", "data:", "x", "The answer is"]
    async with Engine(model, tokenizer, EngineConfig(block_size=8, overlap=overlap)) as engine:
        jobs = []
        for name, schema in SCHEMAS.items():
            for i, prompt in enumerate(prompts):
                params = SamplingParams(max_new_tokens=300, json_schema=schema, temperature=0.0 if i == 0 else 1.0,
                                        seed=i)  # fmt: skip
                jobs.append((name, engine.generate(prompt, params)))
        outs = await asyncio.gather(*(j for _, j in jobs))
        stats = engine.stats()
    for (name, _), out in zip(jobs, outs):
        assert out.finish_reason == "stop", (name, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMAS[name])
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.loops("asyncio")
async def test_regex_grammar_and_json_object_constraints(make_model, tokenizer):
    model, _ = make_model("llama", seed=12)
    ebnf = 'root ::= ("yes" | "no") ", " [0-9]{1,3} "."'
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        regex_outs = await asyncio.gather(*(
            engine.generate(p, SamplingParams(max_new_tokens=40, regex=r"[A-Z][a-z]{2,5}-[0-9]{2}", temperature=1.0,
                                              seed=i))
            for i, p in enumerate(["a", "bb", "ccc"])
        ))  # fmt: skip
        grammar_out = await engine.generate("ok?", SamplingParams(max_new_tokens=40, grammar=ebnf))
        obj = await engine.generate("{", SamplingParams(max_new_tokens=400, json_object=True))
    for out in regex_outs:
        assert out.finish_reason == "stop" and re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{2}", out.text), out.text
    assert re.fullmatch(r"(yes|no), [0-9]{1,3}\.", grammar_out.text), grammar_out.text
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    else:  # an unbounded object may outlast the token budget: what exists is still a valid start of one
        import xgrammar as xgr

        compiled = engine._admission.grammars.compile("json_object", "")
        assert xgr.GrammarMatcher(compiled).accept_string(obj.text)


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("decode_steps", [1, 4], ids=["single", "rounds"])
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("path", ["generic", "lean"])
async def test_unconstrained_rows_beside_constrained_ones_still_match_generate(
    path, overlap, decode_steps, make_model, tokenizer
):
    model, ref = make_model("llama", seed=13)
    prompts = random_prompts(4, [7, 21, 3, 40], len(tokenizer), seed=13)
    expected = [reference_greedy(ref, p, 12) for p in prompts]
    schema = SCHEMAS["numbers"]
    config = EngineConfig(block_size=8, overlap=overlap, decode_steps=decode_steps, fast_path=path == "lean",
                          max_num_batched_tokens=48)  # fmt: skip
    async with Engine(model, tokenizer, config) as engine:

        async def plain(i, p):
            await asyncio.sleep(0.002 * i)
            return await engine.generate(p, SamplingParams(max_new_tokens=12, ignore_eos=True))

        async def constrained(i):
            await asyncio.sleep(0.003 * i)
            return await engine.generate("j", SamplingParams(max_new_tokens=200, json_schema=schema))

        outs = await asyncio.gather(*(plain(i, p) for i, p in enumerate(prompts)), *(constrained(i) for i in range(3)))
    assert [o.token_ids for o in outs[:4]] == expected
    for out in outs[4:]:
        jsonschema.validate(json.loads(out.text), schema)


@pytest.mark.loops("asyncio")
async def test_masks_are_filled_on_the_step_worker_not_the_event_loop(make_model, tokenizer, monkeypatch):
    threads = []
    apply = GrammarMasks.apply

    def spy(self, logits, rows):
        threads.append(threading.current_thread().name)
        return apply(self, logits, rows)

    monkeypatch.setattr(GrammarMasks, "apply", spy)
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        out = await engine.generate("x", SamplingParams(max_new_tokens=30, regex="[a-c]{5}"))
    assert re.fullmatch("[a-c]{5}", out.text)
    assert threads and set(threads) == {"acb-step"}


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "json_schema"),
        (dict(regex="(unclosed"), "regex"),
        (dict(grammar="root ::= missing_rule"), "grammar"),
    ],
)
async def test_a_constraint_that_does_not_compile_is_a_typed_error_and_others_are_served(
    fields, param, make_model, tokenizer
):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        with pytest.raises(InvalidSamplingParamsError, match="could not be compiled") as err:
            await engine.submit("x", SamplingParams(**fields))
        assert err.value.param == param
        out = await engine.generate("x", SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert len(out.token_ids) == 3
        assert engine.stats().num_running == 0


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(json_schema="{not json"), "json_schema"),
        (dict(json_schema=["a"]), "json_schema"),
        (dict(json_schema={"x": float("nan")}), "json_schema"),
        (dict(json_schema={"description": "x" * 70000}), "json_schema"),
        (dict(regex=""), "regex"),
        (dict(regex=5), "regex"),
        (dict(grammar="r" * 70000), "grammar"),
        (dict(regex="a", grammar="root ::= 'a'"), "grammar"),
        (dict(json_object=1), "json_object"),
        (dict(json_object=True, ignore_eos=True), "ignore_eos"),
        (dict(regex="a+", min_tokens=3), "min_tokens"),
    ],
)
def test_malformed_constraints_are_refused_where_they_are_written(fields, param):
    with pytest.raises(InvalidSamplingParamsError) as err:
        SamplingParams(**fields)
    assert err.value.param == param


def test_a_schema_keeps_its_property_order_and_is_immutable():
    p = SamplingParams(json_schema={"type": "object", "properties": {"z": {}, "a": {}}})
    assert p.json_schema.index('"z"') < p.json_schema.index('"a"')
    assert hash(p) == hash(SamplingParams(json_schema=p.json_schema))


@pytest.mark.loops("asyncio")
async def test_breaking_out_of_a_constrained_stream_frees_its_blocks(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        params = SamplingParams(max_new_tokens=300, json_schema=SCHEMAS["array of objects"])
        for _ in range(3):
            async for _tok in engine.stream("go", params):
                break
        out = await engine.generate("go", params)
        stats = engine.stats()
    jsonschema.validate(json.loads(out.text), SCHEMAS["array of objects"])
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0


@pytest.mark.loops("asyncio")
async def test_a_slow_constraint_compile_holds_up_no_prompt(make_model, tokenizer, monkeypatch):
    """Constraints compile in their own thread: a long prompt (tokenized off the loop) does not wait for them."""
    import time

    from acb.grammar import GrammarCompiler

    compile_ = GrammarCompiler.compile
    started = threading.Event()

    def slow(self, kind, text):
        started.set()
        time.sleep(1.0)
        return compile_(self, kind, text)

    monkeypatch.setattr(GrammarCompiler, "compile", slow)
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=8, long_prompt_chars=100, max_model_len=2048)) as eng:
        constrained = asyncio.ensure_future(eng.generate("x", SamplingParams(max_new_tokens=20, regex="[a-c]{4}")))
        while not started.is_set():
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        await eng.submit("word " * 300, SamplingParams(max_new_tokens=1))  # long: tokenized in the tokenizer thread
        waited = time.perf_counter() - t0
        out = await constrained
    assert waited < 0.5, f"the long prompt waited {waited:.2f} s behind a grammar compile"
    assert re.fullmatch("[a-c]{4}", out.text)
