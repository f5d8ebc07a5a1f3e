"""The embedded default model: a tiny Llama built from a config, with random weights, and acb's small tokenizer.

It needs no download, so every example and command runs anywhere; its text is gibberish. Point acb at a real
checkpoint with ``Engine.from_pretrained("path/or/hub-id")``.
"""

from __future__ import annotations

import pathlib

import torch

__all__ = ["default_tokenizer", "tiny_config", "tiny_model", "load_default"]

_TOKENIZER_FILE = pathlib.Path(__file__).resolve().parent / "_data" / "tokenizer.json"


# ChatML-style, as many open checkpoints use; the demo model has no special chat tokens, so markers are text.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def default_tokenizer():
    """acb's byte-level BPE tokenizer (1,024 tokens) as a transformers fast tokenizer, with a chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(_TOKENIZER_FILE),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str = "llama", **overrides):
    """A small config of ``arch`` sized for the CPU (2 layers; 4 where layer kinds alternate). ``arch``: ``llama``,
    ``qwen2``, ``qwen3``, ``mistral`` (sliding window 8), ``qwen2-sliding`` (window 8 above layer 1), ``gemma3``
    (sliding and full layers), ``phi3``, and for the generic path two mixture-of-experts models, ``mixtral`` and
    ``qwen3-moe``, and ``gpt2`` (learned absolute positions: ``max_position_embeddings`` is its ``n_positions``)."""
    import transformers as tf

    tok = default_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    extra = {
        "llama": ("LlamaConfig", {}),
        "qwen2": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", {"head_dim": 16}),
        "mistral": ("MistralConfig", {"sliding_window": 8}),
        "qwen2-sliding": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
        "gemma3": ("Gemma3TextConfig", {
            "head_dim": 16, "num_hidden_layers": 4, "sliding_window": 8, "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "final_logit_softcapping": 30.0, "tie_word_embeddings": True,
        }),
        "phi3": ("Phi3Config", {"sliding_window": 12}),
        "gpt2": ("GPT2Config", {"num_key_value_heads": None, "n_inner": 128}),  # learned positions, no rotary
        "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        "qwen3-moe": ("Qwen3MoeConfig", {
            "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
        }),
    }  # fmt: skip
    if arch not in extra:
        raise ValueError(f"arch must be one of {sorted(extra)}, got {arch!r}")
    name, fields = extra[arch]
    common.update(fields)
    common.update(overrides)
    return getattr(tf, name)(**common)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny causal LM with random weights drawn from ``seed``.

    The norms' weights are drawn too, within ±0.5 of what transformers initialises them to (ones, or zeros where a
    norm scales by ``1 + w``): left at their initial values they would let a test pass with a norm's weight applied
    twice, to the wrong norm, or not at all."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.rand(p.shape, dtype=torch.float32).to(p.dtype) - 0.5)
    return model.eval()


def load_default():
    """``(model, tokenizer)`` of the embedded default."""
    return tiny_model(), default_tokenizer()
