"""A batch job over thousands of prompts through one engine, with a progress bar.

Submitting everything at once is fine: ``EngineConfig.max_pending`` bounds what waits inside the engine, and the
rest waits at admission (backpressure), so memory stays flat.

    python examples/batch_job.py [--n 2000]
"""

import argparse
import asyncio
import time

from tqdm import tqdm

import acb
from acb import Engine, EngineConfig, SamplingParams
from acb.default_model import load_default


async def main(n: int) -> None:
    model, tokenizer = load_default()
    prompts = [f"Item {i}: write a one-line product description" for i in range(n)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    async with Engine(model, tokenizer, EngineConfig(max_num_seqs=256, max_pending=512)) as engine:
        bar = tqdm(total=n, unit="prompt")
        start = time.perf_counter()

        async def one(p: str):
            c = await engine.generate(p, params)
            bar.update()
            return c

        completions = await asyncio.gather(*(one(p) for p in prompts))
        took = time.perf_counter() - start
        bar.close()
    tokens = sum(len(c.token_ids) for c in completions)
    print(f"{n} prompts, {tokens} tokens in {took:.1f} s ({tokens / took:.0f} tok/s on this machine)")
    print("first:", repr(completions[0].text))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    acb.run(main(ap.parse_args().n))
