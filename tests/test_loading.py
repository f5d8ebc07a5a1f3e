"""Engine.from_pretrained on a local directory written by save_pretrained."""

from __future__ import annotations

import pytest
from conftest import reference_greedy

from acb import Engine, InvalidConfigError, SamplingParams


async def test_from_pretrained_local_directory(tmp_path, make_model, tokenizer):
    model, ref = make_model("qwen2", seed=61)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(str(tmp_path), dtype="float32", device="cpu", block_size=8)
    prompt = tokenizer.encode("hello there")
    async with engine:
        out = await engine.generate("hello there", SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert out.token_ids == reference_greedy(ref, prompt, 10)
    assert engine.config.block_size == 8


@pytest.mark.parametrize("trust", ["false", "False", 0, 1, None])
def test_trust_remote_code_must_be_a_bool_and_nothing_loads_before(trust, tmp_path, monkeypatch):
    """``trust_remote_code="false"`` is truthy: it ran a checkpoint's own code. Anything but True or False is
    refused before any file is read."""
    import acb.engine

    monkeypatch.setattr(acb.engine, "load_pretrained", lambda *a: pytest.fail("loaded"))
    with pytest.raises(InvalidConfigError, match="trust_remote_code must be True or False"):
        Engine.from_pretrained(str(tmp_path), device="cpu", trust_remote_code=trust)


@pytest.mark.parametrize("dtype", ["int8", "bf17", 3])
def test_a_bad_dtype_is_refused_before_anything_loads(dtype, tmp_path, monkeypatch):
    import acb.engine

    monkeypatch.setattr(acb.engine, "load_pretrained", lambda *a: pytest.fail("loaded"))
    with pytest.raises(InvalidConfigError, match="dtype must be"):
        Engine.from_pretrained(str(tmp_path), device="cpu", dtype=dtype)


@pytest.mark.parametrize("name, value", [("ACB_PDL", "bogus"), ("ACB_PDL", "3"), ("ACB_SPLIT_PROJECTIONS", "off")])
def test_a_bad_tuning_variable_is_refused_when_an_engine_is_built_on_any_device(name, value, monkeypatch, make_model,
                                                                                 tokenizer):  # fmt: skip
    """docs/tuning.md's variables are checked when an engine is built, on the CPU too (they were only read on a
    Hopper card, and ACB_SPLIT_PROJECTIONS took anything but "0" as on); the model is left as it was."""
    model, ref = make_model("llama", seed=3)
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidConfigError, match=name):
        Engine(model, tokenizer)
    monkeypatch.delenv(name)
    assert reference_greedy(model, [4, 5], 3) == reference_greedy(ref, [4, 5], 3)


def test_a_broken_checkpoint_is_one_typed_error(tmp_path, make_model, tokenizer):
    """A missing directory, a directory without weights, and truncated weights: each a ModelLoadError (an OSError
    too) naming the path, the loader's own error chained (they were transformers', safetensors' and tokenizers'
    errors of every kind, and a traceback from the command line)."""
    from acb import ModelLoadError

    with pytest.raises(ModelLoadError, match="no model directory"):
        Engine.from_pretrained(str(tmp_path / "none"), device="cpu")
    model, _ = make_model("llama", seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="could not load") as err:
        Engine.from_pretrained(str(tmp_path), device="cpu")
    assert isinstance(err.value, OSError) and err.value.__cause__ is not None
    weights.unlink()
    with pytest.raises(ModelLoadError, match="could not load"):
        Engine.from_pretrained(str(tmp_path), device="cpu")
