"""The benchmark workloads and models (random weights, real architectures), as in ``docs/workloads.md``."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch

__all__ = ["Conversation", "Workload", "WORKLOADS", "FAMILY_MODELS", "build_model", "make_requests"]


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # "llama-8b" or "qwen-0.5b" (or "tiny" for CPU tests)
    requests: int
    prompt: int | None  # fixed prompt length, or None for the lognormal law
    new: int | None  # fixed output length, or None for the lognormal law
    note: str = ""
    kind: str = "single"
    """``single``: independent requests; ``prefix``: one of 8 system prompts of 1,024 tokens plus a user suffix of
    32-256 tokens; ``multiturn``: conversations (``requests`` of them) of ``turns`` turns, each resending the whole
    history (a system prompt, then every user message and every generated answer so far)."""
    turns: int = 1

    def scaled(self, scale: float) -> Workload:
        """A smaller copy for quick runs: fewer requests and shorter outputs (prompts keep their length)."""
        if scale >= 1:
            return self
        return replace(
            self,
            requests=max(1, round(self.requests * scale)) if self.prompt is None else self.requests,
            new=None if self.new is None else max(8, round(self.new * scale)),
            note=f"scaled x{scale}",
        )


WORKLOADS = {
    "W-blog": Workload("W-blog", "llama-8b", 32, 128, 8192),
    "W-side": Workload("W-side", "llama-8b", 32, 256, 1024),
    "W-share": Workload("W-share", "llama-8b", 1000, None, None),
    "W-small": Workload("W-small", "qwen-0.5b", 256, 128, 512),
    "W-prefix": Workload("W-prefix", "llama-8b", 1000, None, 128, kind="prefix"),
    "W-prefix-mt": Workload("W-prefix-mt", "llama-8b", 128, None, 128, note="6 turns", kind="multiturn", turns=6),
    # CPU smoke test of the harness itself (tiny random model)
    "W-tiny": Workload("W-tiny", "tiny", 16, 24, 32, note="CPU smoke"),
    # diagnostic: the loop thread's host work per step at W-small's batch (256 sequences), on the CPU's tiny model
    "W-host": Workload("W-host", "tiny", 256, 128, 64, note="CPU diagnostic"),
    # issue 16's family table: run with --model <one of FAMILY_MODELS>, modes async and async[fast_path=false]
    "W-family": Workload("W-family", "llama-1b", 32, 256, 512),
    # issue 17: tensor parallelism (modes async and async[tensor_parallel_size=2]; the 70B shape only sharded)
    "W-tp": Workload("W-tp", "llama-8b", 32, 256, 1024),
    "W-tp70": Workload("W-tp70", "llama-70b", 32, 256, 512),
    # diagnostic: GPU time of a batch-32 decode step at short context (transformers' modules in a graph: 9.12 ms)
    "D-step32": Workload("D-step32", "llama-8b", 32, 8, 64, note="diagnostic"),
}


# The family table of issue 16: each family at a 1-4B shape of a published checkpoint (random bf16 weights).
FAMILY_MODELS = {
    "llama-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                                     tie_word_embeddings=True)),  # Llama 3.2 1B
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                         tie_word_embeddings=True)),
    "qwen3-1.7b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=128, tie_word_embeddings=True)),
    "mistral-3b": ("MistralConfig", dict(vocab_size=32768, hidden_size=3072, intermediate_size=8192,
                                         num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=128, sliding_window=4096)),  # a Ministral-3B-like shape
    "gemma3-1b": ("Gemma3TextConfig", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                                           num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                                           head_dim=256, sliding_window=512, query_pre_attn_scalar=256)),
    "phi3-mini": ("Phi3Config", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, sliding_window=2047)),
}  # fmt: skip


# too large for one GPU: built on the meta device, each tensor-parallel rank makes its own shard's random weights
SHARDED_ONLY = {"llama-70b"}


def build_model(name: str, device: str = "cuda"):
    """A model of the named architecture with random weights, built directly on ``device`` in bf16 (``meta`` for
    the models of :data:`SHARDED_ONLY`, whatever ``device`` says)."""
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if name in FAMILY_MODELS:
        cls, fields = FAMILY_MODELS[name]
        cfg, dtype = getattr(transformers, cls)(max_position_embeddings=16384, **fields), torch.bfloat16
    elif name == "llama-8b":
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                          max_position_embeddings=16384)  # fmt: skip
        dtype = torch.bfloat16
    elif name == "llama-70b":
        cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
                          max_position_embeddings=16384)  # fmt: skip
        dtype = torch.bfloat16
    elif name == "qwen-0.5b":
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=16384)  # fmt: skip
        dtype = torch.bfloat16
    elif name == "tiny":
        from acb.default_model import tiny_config

        cfg, dtype = tiny_config("llama"), torch.float32
    else:
        raise ValueError(f"unknown model {name!r}")
    if name in SHARDED_ONLY:
        device = "meta"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


SYSTEM_PROMPTS, SYSTEM_TOKENS, SUFFIX = 8, 1024, (32, 256)


@dataclass(frozen=True)
class Conversation:
    """A multi-turn chat: turn ``k`` sends ``system + user[0] + answer[0] + ... + user[k]`` (the answers are what the
    engine generated in the earlier turns)."""

    system: list[int]
    users: list[list[int]]
    new: int


def make_requests(w: Workload, vocab: int, seed: int = 0) -> list:
    """``(prompt token ids, new tokens)`` per request (or :class:`Conversation` objects), from a fixed seed."""
    rng = random.Random(seed)
    if w.kind in ("prefix", "multiturn"):
        systems = [[rng.randrange(vocab) for _ in range(SYSTEM_TOKENS)] for _ in range(SYSTEM_PROMPTS)]

        def user() -> list[int]:
            return [rng.randrange(vocab) for _ in range(rng.randint(*SUFFIX))]

        if w.kind == "prefix":
            return [(systems[rng.randrange(SYSTEM_PROMPTS)] + user(), w.new) for _ in range(w.requests)]
        return [
            Conversation(systems[i % SYSTEM_PROMPTS], [user() for _ in range(w.turns)], w.new)
            for i in range(w.requests)
        ]

    def lognormal() -> int:
        return int(min(2048, max(8, round(rng.lognormvariate(math.log(128), 1.0)))))

    out = []
    for _ in range(w.requests):
        p = w.prompt if w.prompt is not None else lognormal()
        n = w.new if w.new is not None else lognormal()
        out.append(([rng.randrange(vocab) for _ in range(p)], n))
    return out


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_OF = _bytes_to_unicode()


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer covering ``vocab_size`` ids (token ``i`` is the word `` w{i}``, except that the first
    256 are the single bytes), so that random token ids of a real vocabulary size detokenize the way Llama 3's and
    Qwen's do (byte-level BPE), at a comparable cost, and a grammar can spell anything (structured output)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    space = "\u0120"  # the byte-level alphabet's spelling of a space
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _BYTE_OF[c])
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab.update({f"{space}w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"{space}w{vocab_size - 1}")
