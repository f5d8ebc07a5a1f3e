"""Embedding acb in an existing asyncio application.

An app with its own tasks (here: a job queue, several workers, a heartbeat) shares one engine. Workers stream
concurrently; one job has a deadline and is cancelled by ``asyncio.timeout``, which aborts its request and frees its
KV blocks at once. The heartbeat shows the loop never stalls while the model computes.

    python examples/embed_in_app.py
"""

import asyncio
import time

import acb
from acb import Engine, EngineConfig, SamplingParams
from acb.default_model import load_default


async def worker(name: str, engine: Engine, jobs: asyncio.Queue, results: dict) -> None:
    while True:
        job_id, prompt, deadline = await jobs.get()
        text = []
        try:
            async with asyncio.timeout(deadline):
                # submit() checks and queues the request now: a bad one raises here, before anything is read
                stream = await engine.submit(prompt, SamplingParams(max_new_tokens=24 if deadline is None else 5000))
                async for tok in stream:
                    text.append(tok.text)
            results[job_id] = ("done", "".join(text))
        except TimeoutError:
            results[job_id] = ("timed out", "".join(text))  # the request was aborted; its blocks are free
        finally:
            jobs.task_done()


async def heartbeat(lags: list[float]) -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - t - 0.005)


async def main() -> None:
    model, tokenizer = load_default()
    async with Engine(model, tokenizer, EngineConfig(max_num_seqs=32)) as engine:
        jobs: asyncio.Queue = asyncio.Queue()
        results: dict = {}
        lags: list[float] = []
        beat = asyncio.create_task(heartbeat(lags))
        workers = [asyncio.create_task(worker(f"w{i}", engine, jobs, results)) for i in range(4)]
        for i in range(12):
            jobs.put_nowait((i, f"job {i}: summarize the news", None))
        jobs.put_nowait(("slow", "an answer that would go on for a long time", 0.2))  # deadline: 200 ms
        await jobs.join()
        for t in (*workers, beat):
            t.cancel()
        stats = engine.stats()
    for job_id, (status, text) in results.items():
        print(f"{job_id!s:>4}: {status:9} {text[:40]!r}")
    print(f"KV blocks free after all jobs: {stats.kv_blocks_free}/{stats.kv_blocks_total}")
    print(f"worst heartbeat lag: {max(lags) * 1e3:.1f} ms over {len(lags)} beats")


if __name__ == "__main__":
    acb.run(main())
