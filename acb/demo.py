"""Streaming demo on the embedded default model: ``python -m acb.demo``.

Streams several prompts concurrently through one engine and prints each as it arrives. The default model has
random weights (its text is gibberish); pass ``--model PATH_OR_HUB_ID`` to run a real checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from . import Engine, SamplingParams
from .default_model import load_default

PROMPTS = ["Once upon a time", "東京は", "async def main():", "Emoji 🚀 "]


async def run(args: argparse.Namespace) -> None:
    if args.model:
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    else:
        engine = Engine(*load_default())
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    async with engine:
        outputs = {p: "" for p in PROMPTS}
        counts = dict.fromkeys(PROMPTS, 0)
        start = time.perf_counter()

        async def one(prompt: str) -> None:
            async for tok in engine.stream(prompt, params):
                outputs[prompt] += tok.text
                counts[prompt] += tok.id is not None

        first = PROMPTS[0]
        rest = [asyncio.create_task(one(p)) for p in PROMPTS[1:]]
        # Stream the first prompt live to the terminal while the others share its batches.
        print(f"{first!r} ->", end=" ", flush=True)
        async for tok in engine.stream(first, params):
            print(tok.text, end="", flush=True)
            counts[first] += tok.id is not None
        print()
        await asyncio.gather(*rest)
        for p in PROMPTS[1:]:
            print(f"{p!r} -> {outputs[p]}")
        took = time.perf_counter() - start
        print(f"\n{sum(counts.values())} tokens for {len(PROMPTS)} concurrent streams in {took:.2f} s", file=sys.stderr)
        if not args.model:
            print(
                "(embedded default model: random weights, so the text is gibberish; "
                "use --model PATH_OR_HUB_ID for a real checkpoint)",
                file=sys.stderr,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local directory or hub id of a causal LM (default: embedded tiny model)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
