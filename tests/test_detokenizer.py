"""Incremental detokenization and stop-string matching."""

from __future__ import annotations

import pytest

from acb import Engine, SamplingParams
from acb.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! Plain ASCII first.",
    "東京は日本の首都です。我们正在构建一个异步推理引擎。",
    "Emoji 😀🚀🎉 with skin tone 👍🏽 and flags 🇫🇷🇯🇵, ZWJ family 👨‍👩‍👧.",
    "Mixed: café naïve Ωμέγα ∑∫√ — 한국어 Привет 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_never_shows_a_replacement_character_mid_stream(tokenizer, text):
    ids = tokenizer.encode(text)
    splits = sum(1 for t in ids if "\ufffd" in tokenizer.decode([t]))
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    if any(ord(c) > 0xFFFF for c in text):
        assert splits > 0  # the case under test: characters really were split across tokens


def test_special_tokens_are_skipped(tokenizer):
    ids = [tokenizer.bos_token_id] + tokenizer.encode("abc") + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join([detok.add(t) for t in ids] + [detok.flush()]) == "abc"


def test_an_incomplete_character_at_the_end_is_flushed_as_decode_does(tokenizer):
    ids = tokenizer.encode("ok 🚀")
    partial = ids[:-1]
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join([detok.add(t) for t in partial] + [detok.flush()])
    assert text == tokenizer.decode(partial, skip_special_tokens=True)


async def test_streamed_text_concatenates_to_decode_on_random_outputs(make_model, tokenizer):
    """Sampled gibberish from a random model splits multi-byte characters often: the invariant must hold."""
    model, _ = make_model("llama", seed=31)
    async with Engine(model, tokenizer) as engine:
        for i, prompt in enumerate(TEXTS):
            toks = [
                t
                async for t in engine.stream(
                    prompt, SamplingParams(max_new_tokens=60, temperature=1.2, seed=i, ignore_eos=True)
                )
            ]
            ids = [t.id for t in toks]
            full = tokenizer.decode(ids, skip_special_tokens=True)
            assert "".join(t.text for t in toks) == full
            for t in toks[:-1]:  # mid-stream deltas hold no replacement char unless the full text has one there
                if "\ufffd" in t.text:
                    assert "\ufffd" in full
