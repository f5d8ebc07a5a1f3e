"""Train the small byte-level BPE tokenizer shipped in ``acb/_data/tokenizer.json`` (the embedded default model's).

Run once, offline: ``python scripts/train_tokenizer.py``. The corpus is English, code, CJK, accented text and emoji,
so that multi-byte characters are split across tokens and exercise incremental detokenization.
"""

from __future__ import annotations

import pathlib
import pydoc

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>"]

MULTILINGUAL = """
The quick brown fox jumps over the lazy dog. Continuous batching keeps the GPU busy.
Les élèves étudient à l'école; ça coûte cher. Über den Wolken muß die Freiheit wohl grenzenlos sein.
東京は日本の首都です。今日は良い天気ですね。我们正在构建一个异步推理引擎。
한국어 문장도 조금 있습니다. Привет, как дела? Γειά σου κόσμε.
Emoji: 😀 🚀 🎉 👍🏽 ❤️ 🇫🇷 — and symbols: ∑ ∫ √ ≤ ≥ € £ ¥.
def stream(prompt): return [token for token in engine.generate(prompt)]
async with engine: async for tok in engine.stream("hello"): print(tok.text, end="")
"""


def corpus() -> list[str]:
    texts = [MULTILINGUAL] * 20
    for name in ("asyncio", "json", "collections", "itertools", "functools", "pathlib", "typing", "re"):
        texts.append(pydoc.render_doc(name, renderer=pydoc.plaintext))
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    out = pathlib.Path(__file__).resolve().parent.parent / "acb" / "_data" / "tokenizer.json"
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
