"""Streaming quick start: one engine, one prompt, tokens printed as they arrive.

    python examples/quickstart.py ["your prompt"]

Runs on the embedded default model (random weights: gibberish text). For a real model:
``Engine.from_pretrained("PATH_OR_HUB_ID", device="cuda", dtype="bfloat16")``.
"""

import sys

import acb
from acb import Engine, SamplingParams
from acb.default_model import load_default


async def main(prompt: str) -> None:
    model, tokenizer = load_default()
    async with Engine(model, tokenizer) as engine:
        async for tok in engine.stream(prompt, SamplingParams(max_new_tokens=40, temperature=0.8, seed=0)):
            print(tok.text, end="", flush=True)
            if tok.finish_reason:
                print(f"\n[finish_reason={tok.finish_reason}]")


if __name__ == "__main__":
    acb.run(main(sys.argv[1] if len(sys.argv) > 1 else "Once upon a time"))  # uvloop when installed
