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

import torch

from acb import (
    Engine,
    EngineConfig,
    InvalidRequestError,
    RequestFailedError,
    SamplingParams,
    StreamInUseError,
    WrongEventLoopError,
)
from acb.config import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

MAX_NEW = 40
POOL = 120  # distinct prompts: references are computed once per (prompt, decoding) key
POISON = 3  # a prompt holding this token id gets NaN logits (see `poison`); pool prompts never hold it
# 64 stop strings of 256 characters that the model's text never holds: the matcher's worst case, outputs unchanged
NEVER_STOPS = tuple(f"{i:02d}\x00" + "\x01" * (MAX_STOP_STRING_CHARS - 3) for i in range(MAX_STOP_STRINGS))


def poison(model) -> None:
    """Make ``model`` produce NaN logits for every sampled row whose query (this step's chunk) holds ``POISON``."""
    forward = model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        ids, meta, keep = kwargs["input_ids"][0], kwargs["acb_meta"], kwargs["logits_to_keep"]
        starts = torch.tensor(meta.query_start_loc)
        for row, idx in enumerate(keep.tolist()):
            seq = int(torch.searchsorted(starts, idx, right=True)) - 1
            if (ids[starts[seq] : starts[seq + 1]] == POISON).any():
                out.logits[0, row] = float("nan")
        return out

    model.forward = poisoned


@dataclasses.dataclass
class SoakReport:
    requests: int = 0
    finished: int = 0
    cancelled: dict = dataclasses.field(default_factory=dict)  # by kind: break, task_cancel, abort, timeout
    invalid: int = 0
    invalid_rejected_typed: int = 0
    faults_injected: int = 0
    failed_by_fault: int = 0
    poisoned: int = 0
    poisoned_failed_alone: int = 0
    second_consumers_refused: int = 0
    other_loops: int = 0
    other_loops_refused: int = 0
    breaks_not_ended_at_once: int = 0
    slow_consumers: int = 0
    tokens: int = 0
    checked_against_reference: int = 0
    checked_by_kind: dict = dataclasses.field(default_factory=dict)  # plain, penalized, regex (KINDS)
    mismatches: int = 0
    untyped_errors: int = 0
    streams_hung: int = 0
    blocks_leaked: int = 0
    tasks_left_pending: int = 0
    preemptions: int = 0
    prefix_cache_hits: int = 0
    prefix_cached_tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0

    def problems(self) -> list[str]:
        out = []
        names = ("mismatches", "untyped_errors", "streams_hung", "blocks_leaked", "tasks_left_pending")
        for name in (*names, "breaks_not_ended_at_once"):
            if getattr(self, name):
                out.append(f"{name}={getattr(self, name)}")
        if self.invalid_rejected_typed != self.invalid:
            out.append(
                f"invalid requests not rejected with a typed error: {self.invalid - self.invalid_rejected_typed}"
            )
        if self.other_loops_refused != self.other_loops:
            out.append(f"calls from another loop not refused: {self.other_loops - self.other_loops_refused}")
        if self.poisoned_failed_alone != self.poisoned:
            out.append(f"poisoned requests that did not fail alone: {self.poisoned - self.poisoned_failed_alone}")
        return out


def _key(req: dict) -> tuple:
    return (req["prompt"], req["seed"], req["ignore_eos"], req["kind"])


# What a request asks of its logits besides sampling: nothing, penalties and a bias (per-slot history on the
# device), or a regex (a grammar matcher on the step worker). Their outputs must not depend on the chaos either.
KINDS = {
    "plain": {},
    "penalized": dict(presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={7: 2.0}),
    "regex": dict(regex=r"[a-z ]{0,40}[.!?]"),
}


def _params(req: dict, max_new: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    extra = KINDS[req["kind"]]
    if req["seed"] is None:
        return SamplingParams(max_new_tokens=max_new, ignore_eos=req["ignore_eos"], stop=stop, **extra)
    return SamplingParams(
        max_new_tokens=max_new, temperature=0.9, top_p=0.95, seed=req["seed"], ignore_eos=req["ignore_eos"], stop=stop,
        **extra,
    )  # fmt: skip


# What an adversarial caller sends: each builds its call lazily, so that a refusal at construction counts too.
_BAD_PARAMS = [
    dict(top_k=2**63),
    dict(temperature=10**400),
    dict(temperature=float("nan")),
    dict(logprobs=None),
    dict(stop=None),
    dict(stop=5),
    dict(stop_token_ids=None),
    dict(stop=["x"] * 10_000),
    dict(stop=["y" * 100_000]),
]


def _invalid(rng: random.Random, engine: Engine, vocab: int):
    """A call that must be refused with an ``InvalidRequestError``."""
    kind = rng.choice(["empty", "oov", "negative", "too_long", "type", "stop_ids", "params", "huge", "unicode", "id"])
    ok = SamplingParams(max_new_tokens=4)
    if kind == "empty":
        return lambda: engine.generate(rng.choice(["", []]), ok)
    if kind == "oov":
        return lambda: engine.generate([1, 2, vocab + rng.randrange(1000)], ok)
    if kind == "negative":
        return lambda: engine.generate([1, -5], ok)
    if kind == "too_long":
        return lambda: engine.generate([5] * (engine.max_model_len + rng.randrange(50)), ok)
    if kind == "type":
        return lambda: engine.generate(rng.choice([None, 3.5, {"a": 1}]), ok)
    if kind == "params":
        fields = rng.choice(_BAD_PARAMS)
        return lambda: engine.generate([5, 6], SamplingParams(**fields))
    if kind == "huge":  # past max_prompt_chars: refused before the tokenizer sees it
        return lambda: engine.generate("word " * (engine.max_model_len * 4), ok)
    if kind == "unicode":
        return lambda: engine.generate("a lone \ud800 surrogate", ok)
    if kind == "id":
        return lambda: engine.generate("hi", ok, request_id=["unhashable"])
    return lambda: engine.generate([5, 6], SamplingParams(stop_token_ids=[vocab + 7]))


def _from_another_loop(engine: Engine) -> bool:
    """Use the engine from a second event loop in another thread: refused at once with WrongEventLoopError."""
    try:
        asyncio.run(engine.generate([5, 6], SamplingParams(max_new_tokens=2)))
    except WrongEventLoopError:
        return True
    return False


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
    pool = [[rng.randrange(POISON + 1, vocab) for _ in range(rng.randint(1, 64))] for _ in range(POOL)]
    reqs = []
    for i in range(n_requests):
        p = rng.randrange(POOL)
        kind = rng.choices(list(KINDS), weights=[80, 10, 10])[0]
        reqs.append(
            dict(
                id=f"soak-{i}",
                prompt=p,
                seed=None if rng.random() < 0.7 else p,
                ignore_eos=rng.random() < 0.5 and kind != "regex",  # a constrained output ends with its grammar
                kind=kind,
                max_new=rng.randint(1, MAX_NEW),
                chaos=rng.choices(
                    ["normal", "slow", "break", "task_cancel", "abort", "timeout", "invalid"]
                    + ["two_consumers", "poison", "many_stops", "other_loop"],
                    weights=[36, 10, 10, 10, 10, 5, 10, 3, 2, 3, 1],
                )[0],
                at=rng.randint(1, MAX_NEW),
            )
        )

    # Calm reference: every (prompt, decoding) key once, all at once, with the longest output, no chaos.
    keys = sorted({_key(r) for r in reqs if r["chaos"] not in ("invalid", "poison", "other_loop")}, key=str)
    async with Engine(model_factory(), tokenizer, copy.deepcopy(config)) as calm:
        outs = await asyncio.gather(
            *(calm.generate(pool[k[0]], _params(dict(seed=k[1], ignore_eos=k[2], kind=k[3]), MAX_NEW)) for k in keys)
        )
    reference = {k: o.token_ids for k, o in zip(keys, outs)}

    # The chaotic run, with a forward that fails now and then.
    report = SoakReport(requests=n_requests)
    cancelled: Counter = Counter()
    model = model_factory()
    poison(model)
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
        chaos, at = req["chaos"], min(req["at"], req["max_new"])
        if chaos == "invalid":
            report.invalid += 1
            try:
                await _invalid(rng, engine, vocab)()
            except InvalidRequestError:
                report.invalid_rejected_typed += 1
            return
        if chaos == "other_loop":
            refused = await asyncio.to_thread(_from_another_loop, engine)  # not `+= await`: it would read first
            report.other_loops_refused += refused
            report.other_loops += 1
            return
        if chaos == "poison":
            report.poisoned += 1
            try:
                await engine.generate([*pool[req["prompt"]], POISON], _params(req, req["max_new"]))
            except RequestFailedError as exc:
                report.poisoned_failed_alone += "non-finite" in str(exc) or "injected" in str(exc.__cause__)
            return
        params = _params(req, req["max_new"], NEVER_STOPS if chaos == "many_stops" else ())
        got: list[int] = []
        last = None
        stream = engine.stream(pool[req["prompt"]], params, request_id=req["id"])
        report.slow_consumers += chaos == "slow"
        try:
            async with asyncio.timeout(rng.uniform(0.0, 0.03) if chaos == "timeout" else None):
                async for last in stream:
                    if last.id is not None:
                        got.append(last.id)
                    if chaos == "slow":
                        await asyncio.sleep(rng.uniform(0, 0.003))
                    if chaos == "two_consumers" and len(got) == 1:
                        try:
                            async for _ in stream:
                                pass
                        except StreamInUseError:
                            report.second_consumers_refused += 1
                    if len(got) == at and last.finish_reason is None:
                        if chaos == "break":
                            break
                        if chaos == "abort":
                            engine.abort(req["id"])
            if chaos == "break" and last is not None and last.finish_reason is None:
                # `stream` is still referenced here: leaving the loop must have ended the request anyway
                report.breaks_not_ended_at_once += req["id"] in engine._live
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
        elif chaos not in ("timeout", "normal", "slow", "two_consumers", "many_stops"):
            cancelled[chaos] += 1
        want = reference[_key(req)][: req["max_new"]]
        report.checked_against_reference += 1
        report.checked_by_kind[req["kind"]] = report.checked_by_kind.get(req["kind"], 0) + 1
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
        report.prefix_cache_hits = stats.prefix_hits
        report.prefix_cached_tokens = stats.prefix_cached_tokens
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
