"""The chaos soak: thousands of requests with random sizes, bursts, cancellations, slow consumers, invalid input
and injected step faults, checked against a calm reference run.

Used by ``tests/test_reliability.py`` (2,000 requests in CI, 10,000 with ``--soak-long``) and runnable on its own
to produce the figures in ``docs/reliability.md``::

    python tests/soak.py --requests 10000 --seed 0
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import logging
import random
import time
from collections import Counter

from acb import Engine, EngineConfig, InvalidRequestError, RequestFailedError, SamplingParams

MAX_NEW = 40
POOL = 120  # distinct prompts: references are computed once per (prompt, decoding) key


@dataclasses.dataclass
class SoakReport:
    requests: int = 0
    finished: int = 0
    cancelled: dict = dataclasses.field(default_factory=dict)  # by kind: break, task_cancel, abort, timeout
    invalid: int = 0
    invalid_rejected_typed: int = 0
    faults_injected: int = 0
    failed_by_fault: int = 0
    slow_consumers: int = 0
    tokens: int = 0
    checked_against_reference: int = 0
    mismatches: int = 0
    untyped_errors: int = 0
    streams_hung: int = 0
    blocks_leaked: int = 0
    tasks_left_pending: int = 0
    preemptions: int = 0
    steps: int = 0
    wall_s: float = 0.0

    def problems(self) -> list[str]:
        out = []
        for name in ("mismatches", "untyped_errors", "streams_hung", "blocks_leaked", "tasks_left_pending"):
            if getattr(self, name):
                out.append(f"{name}={getattr(self, name)}")
        if self.invalid_rejected_typed != self.invalid:
            out.append(
                f"invalid requests not rejected with a typed error: {self.invalid - self.invalid_rejected_typed}"
            )
        return out


def _key(req: dict) -> tuple:
    return (req["prompt"], req["seed"], req["ignore_eos"])


def _params(req: dict, max_new: int) -> SamplingParams:
    if req["seed"] is None:
        return SamplingParams(max_new_tokens=max_new, ignore_eos=req["ignore_eos"])
    return SamplingParams(
        max_new_tokens=max_new, temperature=0.9, top_p=0.95, seed=req["seed"], ignore_eos=req["ignore_eos"]
    )


def _invalid(rng: random.Random, vocab: int, max_model_len: int):
    kind = rng.choice(["empty", "oov", "negative", "too_long", "type", "stop_ids"])
    if kind == "empty":
        return rng.choice(["", []]), None
    if kind == "oov":
        return [1, 2, vocab + rng.randrange(1000)], None
    if kind == "negative":
        return [1, -5], None
    if kind == "too_long":
        return [3] * (max_model_len + rng.randrange(50)), None
    if kind == "type":
        return rng.choice([None, 3.5, {"a": 1}]), None
    return [5, 6], SamplingParams(stop_token_ids=[vocab + 7])


async def soak(
    model_factory,
    tokenizer,
    n_requests: int,
    seed: int = 0,
    fault_rate: float = 0.004,
    config: EngineConfig | None = None,
) -> SoakReport:
    rng = random.Random(seed)
    vocab = len(tokenizer)
    config = config or EngineConfig(
        max_num_seqs=64, max_num_batched_tokens=256, block_size=8, num_kv_blocks=160, max_model_len=256
    )
    pool = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 64))] for _ in range(POOL)]
    reqs = []
    for i in range(n_requests):
        p = rng.randrange(POOL)
        reqs.append(
            dict(
                id=f"soak-{i}",
                prompt=p,
                seed=None if rng.random() < 0.7 else p,
                ignore_eos=rng.random() < 0.5,
                max_new=rng.randint(1, MAX_NEW),
                chaos=rng.choices(
                    ["normal", "slow", "break", "task_cancel", "abort", "timeout", "invalid"],
                    weights=[45, 10, 10, 10, 10, 5, 10],
                )[0],
                at=rng.randint(1, MAX_NEW),
            )
        )

    # Calm reference: every (prompt, decoding) key once, all at once, with the longest output, no chaos.
    keys = sorted({_key(r) for r in reqs if r["chaos"] != "invalid"}, key=str)
    async with Engine(model_factory(), tokenizer, copy.deepcopy(config)) as calm:
        outs = await asyncio.gather(
            *(calm.generate(pool[k[0]], _params(dict(seed=k[1], ignore_eos=k[2]), MAX_NEW)) for k in keys)
        )
    reference = {k: o.token_ids for k, o in zip(keys, outs)}

    # The chaotic run, with a forward that fails now and then.
    report = SoakReport(requests=n_requests)
    cancelled: Counter = Counter()
    model = model_factory()
    forward = model.forward
    fault_rng = random.Random(seed + 1)

    def faulty(*args, **kwargs):
        if fault_rng.random() < fault_rate:
            report.faults_injected += 1
            raise RuntimeError("injected step fault")
        return forward(*args, **kwargs)

    model.forward = faulty
    engine = Engine(model, tokenizer, copy.deepcopy(config))
    start = time.perf_counter()

    async def consume(req: dict) -> None:
        nonlocal report
        if req["chaos"] == "invalid":
            report.invalid += 1
            prompt, params = _invalid(rng, vocab, engine.max_model_len)
            try:
                await engine.generate(prompt, params)
            except InvalidRequestError:
                report.invalid_rejected_typed += 1
            return
        params = _params(req, req["max_new"])
        got: list[int] = []
        last = None
        stream = engine.stream(pool[req["prompt"]], params, request_id=req["id"])
        chaos, at = req["chaos"], min(req["at"], req["max_new"])
        report.slow_consumers += chaos == "slow"
        try:
            async with asyncio.timeout(rng.uniform(0.0, 0.03) if chaos == "timeout" else None):
                async for last in stream:
                    if last.id is not None:
                        got.append(last.id)
                    if chaos == "slow":
                        await asyncio.sleep(rng.uniform(0, 0.003))
                    if len(got) == at and last.finish_reason is None:
                        if chaos == "break":
                            break
                        if chaos == "abort":
                            engine.abort(req["id"])
        except TimeoutError:
            cancelled["timeout"] += 1
        except asyncio.CancelledError:
            cancelled["task_cancel"] += 1
            raise
        except RequestFailedError:
            report.failed_by_fault += 1
            return
        except Exception:
            report.untyped_errors += 1  # nothing else may escape a stream
            return
        finally:
            report.tokens += len(got)
        finished = last is not None and last.finish_reason in ("length", "stop")
        if finished:
            report.finished += 1
        elif chaos != "timeout":
            cancelled[chaos] += 1
        want = reference[_key(req)][: req["max_new"]]
        report.checked_against_reference += 1
        if got != (want if finished else want[: len(got)]):
            report.mismatches += 1

    async with engine:
        tasks = []
        i = 0
        while i < n_requests:
            burst = rng.randint(1, 60)
            for req in reqs[i : i + burst]:
                t = asyncio.create_task(consume(req))
                if req["chaos"] == "task_cancel":
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.03), t.cancel)
                tasks.append(t)
            i += burst
            await asyncio.sleep(rng.uniform(0, 0.015))
        done, hung = await asyncio.wait(tasks, timeout=600)
        report.streams_hung = len(hung)
        for t in hung:
            t.cancel()
        await asyncio.sleep(0)
        stats = engine.stats()
        report.blocks_leaked = stats.kv_blocks_total - stats.kv_blocks_free
        report.preemptions = stats.num_preemptions
        report.steps = stats.steps
        if engine._live:
            report.streams_hung += len(engine._live)
    report.wall_s = time.perf_counter() - start
    report.cancelled = dict(cancelled)
    current = asyncio.current_task()
    report.tasks_left_pending = sum(1 for t in asyncio.all_tasks() if t is not current and not t.done())
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description="acb chaos soak on the embedded tiny model (CPU)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--uvloop", action="store_true")
    a = ap.parse_args()
    from acb.default_model import default_tokenizer, tiny_model

    logging.getLogger("acb").setLevel(logging.CRITICAL)  # injected faults are logged with tracebacks otherwise
    runner = asyncio.run
    if a.uvloop:
        import uvloop

        runner = uvloop.run
    report = runner(soak(lambda: tiny_model("llama", seed=7), default_tokenizer(), a.requests, a.seed))
    print(json.dumps(dataclasses.asdict(report), indent=2))
    if report.problems():
        raise SystemExit("soak found problems: " + ", ".join(report.problems()))


if __name__ == "__main__":
    main()
