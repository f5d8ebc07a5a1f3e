"""Quick look at the eager engine on the GPU: llama-8b shape (random weights), a shrunk W-side, async vs sync.

    python bench/smoke_llama8b.py [--requests 32] [--prompt 256] [--new 128]

Prints tokens/s for each mode, measured in the same process. Not the benchmark harness (that is bench/ proper).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from acb import Engine, EngineConfig, SamplingParams
from acb.default_model import default_tokenizer


def build(arch: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if arch == "llama-8b":
        cfg = LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rope_theta=500000.0,
        )
    else:
        cfg = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval(), cfg.vocab_size


async def run(engine: Engine, prompts, new: int) -> tuple[float, int]:
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama-8b", choices=["llama-8b", "qwen-0.5b"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    a = ap.parse_args()
    model, vocab = build(a.arch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (a.prompt,), generator=g).tolist() for _ in range(a.requests)]
    print(torch.cuda.get_device_name(), f"{a.arch} {a.requests}x{a.prompt}->{a.new}")
    for overlap in (True, False):
        config = EngineConfig(
            max_num_seqs=a.requests, max_model_len=a.prompt + a.new + 16, overlap=overlap, max_num_batched_tokens=4096
        )
        engine = Engine(model, default_tokenizer(), config)
        async with engine:
            await run(engine, prompts[:2], 4)  # warm-up
            took, toks = await run(engine, prompts, a.new)
        mode = "async" if overlap else "sync"
        print(f"{mode:5}  {took:7.2f} s  {toks / took:8.1f} tok/s  steps={engine.stats().steps}")


if __name__ == "__main__":
    asyncio.run(main())
