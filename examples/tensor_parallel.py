"""Tensor parallelism: one model split over two processes, the engine's own and one that acb starts.

    python examples/tensor_parallel.py

On the CPU the ranks talk over gloo (what this example runs); on CUDA each rank takes one GPU and they talk over
NCCL. acb starts the other ranks with multiprocessing's "spawn", which imports this script again in each of them:
build the engine only under ``if __name__ == "__main__":`` (as below). See docs/parallel.md.
"""

import asyncio
import copy

import acb
from acb import Engine, EngineConfig, SamplingParams
from acb.default_model import load_default

PROMPTS = ["The river", "Once upon a time", "In the beginning"]


async def generate(model, tokenizer, tensor_parallel_size: int) -> list[list[int]]:
    config = EngineConfig(tensor_parallel_size=tensor_parallel_size, fast_path=True)
    async with Engine(model, tokenizer, config) as engine:
        print(f"tensor_parallel_size={tensor_parallel_size}: {engine.path_reason}")
        params = SamplingParams(max_new_tokens=16, temperature=0)
        outs = await asyncio.gather(*(engine.generate(p, params) for p in PROMPTS))
    for p, o in zip(PROMPTS, outs):
        print(f"  {p!r} -> {o.text!r}")
    return [o.token_ids for o in outs]


async def main() -> None:
    model, tokenizer = load_default()
    two = await generate(model, tokenizer, 2)
    one = await generate(copy.deepcopy(model), tokenizer, 1)
    print(f"same tokens as one process: {two == one}")


if __name__ == "__main__":
    acb.run(main())
