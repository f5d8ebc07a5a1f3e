"""Run the benchmark workloads in async and sync mode, in one process, and print a table.

    python -m bench.run --workloads W-side,W-small [--modes async,sync] [--scale 0.25] [--json out.json]
    python -m bench.run --suite docs --json r.json --markdown r.md --timeline timeline.png   # docs/benchmarks.md

Every figure names the workload, the mode and the card; compare only rows of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import itertools
import json
import os
import re
import subprocess
import sys
import time

import torch

from acb import Engine, EngineConfig, SamplingParams
from acb.kv_cache import ModelShape

from .metrics import LoopLag, decode_floor, idle_fraction, percentile, step_kinds
from .workloads import FAMILY_MODELS, WORKLOADS, Conversation, build_model, make_requests, synthetic_tokenizer

# A JSON schema that a random model cannot finish within W-side's 1,024 tokens (at least 400 items), so constrained
# requests run their full length like the others: only the masks' cost differs.
LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 64},
        "items": {
            "type": "array",
            "minItems": 400,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 100000},
                    "name": {"type": "string", "maxLength": 40},
                    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                },
                "required": ["id", "name", "tags"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}
PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)


def request_params(index: int, new: int, constrained: float = 0.0, penalties: bool = False) -> SamplingParams:
    """Request ``index``'s parameters: greedy to its full length; every ``1 / constrained``-th one constrained by
    :data:`LONG_SCHEMA` (it stops only at its length, like the rest), and :data:`PENALTIES` on all if asked."""
    extra = dict(PENALTIES) if penalties else {}
    if constrained and index % round(1 / constrained) == 0:
        return SamplingParams(max_new_tokens=new, json_schema=LONG_SCHEMA, **extra)
    return SamplingParams(max_new_tokens=new, ignore_eos=True, **extra)


async def run_one(
    engine: Engine,
    requests: list,
    profile: bool = False,
    progress: str | None = None,
    constrained: float = 0.0,
    penalties: bool = False,
) -> dict:
    """Run ``requests`` (``(prompt, new)`` pairs, or conversations whose turns run one after the other) all at
    once and measure them (``constrained``, ``penalties``: see :func:`request_params`)."""
    lag = LoopLag()
    ttft, itl = [], []
    counts = []
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=progress, unit="req", file=sys.stderr, leave=False)

    index = itertools.count()

    async def one(prompt: list[int], new: int) -> list[int]:
        t0 = time.perf_counter()
        last = None
        out = []
        params = request_params(next(index), new, constrained, penalties)
        async for tok in engine.stream(prompt, params):
            now = time.perf_counter()
            if last is None:
                ttft.append(now - t0)
            else:
                itl.append(now - last)
            last = now
            if tok.id is not None:
                out.append(tok.id)
        counts.append(len(out))
        if bar is not None:
            bar.update()
        return out

    async def conversation(c: Conversation) -> None:
        history = list(c.system)
        for user in c.users:
            history += user
            history += await one(history, c.new)

    def drive(item):
        return conversation(item) if isinstance(item, Conversation) else one(*item)

    lag.start()
    prof = None
    if profile:  # the event-loop thread's host work (the launch worker thread is not profiled)
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    start = time.perf_counter()
    cpu0 = time.thread_time()
    await asyncio.gather(*(drive(item) for item in requests))
    wall = time.perf_counter() - start
    loop_cpu = time.thread_time() - cpu0
    await lag.stop()
    if bar is not None:
        bar.close()
    if prof is not None:
        import pstats

        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(18)
    tokens = sum(counts)
    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "tok_per_s": tokens / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
        "loop_lag_p50_ms": percentile(lag.lags, 50),
        "loop_lag_p99_ms": percentile(lag.lags, 99),
        "steps": engine.stats().steps,
        "loop_thread_cpu_s": loop_cpu,
    }


def _turn_lengths(requests: list) -> list[tuple[int, int]]:
    """``(prompt tokens, new tokens)`` of every request, conversations' turns included (their history as it
    grows)."""
    out = []
    for r in requests:
        if isinstance(r, Conversation):
            history = len(r.system)
            for user in r.users:
                history += len(user)
                out.append((history, r.new))
                history += r.new
        else:
            out.append((len(r[0]), r[1]))
    return out


def _first_prompt(r) -> list[int]:
    return r.system + r.users[0] if isinstance(r, Conversation) else r[0]


def run_transformers(model, requests: list[tuple[list[int], int]], use_async: bool) -> dict:
    """transformers' own continuous batching (``generate_batch``) on the same weights: the peer baseline."""
    import transformers
    from packaging.version import Version
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    # paged SDPA for continuous batching: "paged|sdpa" until 5.22 (the card's 5.17), plain "sdpa" from 5.23 on
    old = Version(transformers.__version__) < Version("5.23")
    model.set_attn_implementation("paged|sdpa" if old else "sdpa")
    new = max(n for _, n in requests)
    gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(use_async_batching=use_async)
    if not torch.cuda.is_available():  # on the CPU (tests), a cache for this workload, not a share of all the RAM
        page = getattr(cb, "page_size", None) or 256
        cb.num_blocks = sum(-(-(len(p) + new) // page) for p, _ in requests) + 2
    inputs = [p for p, _ in requests]
    model.generate_batch(inputs[:2], generation_config=gen, continuous_batching_config=cb, progress_bar=False)
    start = time.perf_counter()
    out = model.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb, progress_bar=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    nan = float("nan")
    return {
        "wall_s": wall, "output_tokens": tokens, "tok_per_s": tokens / wall, "ttft_p50_ms": nan, "ttft_p99_ms": nan,
        "itl_p50_ms": nan, "itl_p99_ms": nan, "loop_lag_p50_ms": nan, "loop_lag_p99_ms": nan, "steps": 0,
        "loop_thread_cpu_s": nan, "gpu_step_ms_p50": nan, "loop_cpu_ms_per_step": nan, "preemptions": nan,
    }  # fmt: skip


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * 10 * x.numel() / (time.perf_counter() - t)


KERNEL_CATEGORIES = [  # (category, substrings of kernel names), first match wins
    ("attention", ("_decode_split", "_decode_merge", "_prefill_kernel", "attention", "flash")),
    ("all-reduce / gather", ("nccl", "one_shot", "_barrier", "allreduce", "all_reduce")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "splitkreduce", "cublas", "_skinny")),
    ("norm / rotary / activation (fused)", ("rmsnorm", "_rope", "_silu", "_gelu")),
    ("sampling", ("argmax", "softmax", "topk", "sort", "multinomial", "_penalties")),
]


def kernel_category(name: str) -> str:
    """The group a GPU kernel's time counts in (the ``--kernels`` summary): GEMMs, attention, the fused small
    kernels, collectives, sampling, or other (copies, element-wise torch kernels)."""
    low = name.lower()
    return next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


@contextlib.contextmanager
def kernel_profile(top: int):
    """Profile the GPU kernels run inside the block (CUDA, ``top`` > 0): yields a dict that is filled afterwards
    with GPU ms per :func:`kernel_category` (``"categories"``) and the ``top`` kernels by total GPU time
    (``"top"``: ``{"name", "calls", "gpu_ms"}``), and prints both."""
    found: dict = {}
    if top <= 0 or not torch.cuda.is_available():
        yield found
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield found
    torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(e.name, [0, 0.0])
            t[0] += 1
            t[1] += e.time_range.elapsed_us() / 1e3
    everything = sum(t[1] for t in totals.values())
    print(f"GPU kernel time: {everything:.1f} ms in {sum(t[0] for t in totals.values())} kernels", file=sys.stderr)
    categories: dict[str, float] = {}
    for name, (_, ms) in totals.items():
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + ms
    found["categories"] = dict(sorted(categories.items(), key=lambda kv: -kv[1]))
    for category, ms in found["categories"].items():
        print(f"  {ms:10.1f} ms {100 * ms / everything:5.1f} %  [{category}]", file=sys.stderr)
    found["top"] = []
    for name, (calls, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        found["top"].append({"name": name, "calls": calls, "gpu_ms": ms})
        print(f"  {ms:10.1f} ms {100 * ms / everything:5.1f} % {calls:8d}  {name[:110]}", file=sys.stderr)


def parse_mode(mode: str) -> tuple[str, dict]:
    """``"async"`` or ``"async[admission_group=1,overlap_depth=3]"``: acb's mode and EngineConfig overrides (an
    A/B row in the same run)."""
    base, _, rest = mode.partition("[")
    if base not in ("async", "sync"):
        raise ValueError(f"unknown mode {mode!r} (acb: async, sync; transformers CB: hf-sync, hf-async)")
    overrides = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            overrides[key] = value.lower() == "true"
        else:
            try:
                overrides[key] = float(value) if "." in value else int(value)
            except ValueError:  # a word: admission_order=longest_first
                overrides[key] = value
    return base, overrides


SUITES = {
    # every figure of docs/benchmarks.md: (workload, modes, drawn in the timeline picture), in an order that builds
    # each model once and runs transformers' modes on intact weights (before acb's lean path takes the model over)
    "docs": [
        ("W-side", "hf-sync,hf-async,async,sync", True),
        ("W-blog", "async,sync", False),
        ("W-share", "async,sync,async[admission_group=1]", False),
        ("D-step32", "async", False),
        ("W-small", "async,sync", True),
    ],
}


def _plan(args) -> list[tuple[str, list[str], bool]]:
    """``(workload, modes, traced)`` in run order: a named suite, or each of ``--workloads`` with ``--modes``."""
    if args.suite:
        return [(w, split_modes(modes), traced and bool(args.timeline)) for w, modes, traced in SUITES[args.suite]]
    return [(w, split_modes(args.modes), bool(args.timeline)) for w in args.workloads.split(",")]


def split_modes(modes: str) -> list[str]:
    """``"async,sync,async[a=1,b=2]"`` -> ``["async", "sync", "async[a=1,b=2]"]`` (commas inside brackets stay)."""
    return re.findall(r"[^,\[]+(?:\[[^\]]*\])?", modes)


def _commit() -> str:
    """The checkout's commit (``ACB_COMMIT`` where the tree is a copy without ``.git``)."""
    if os.environ.get("ACB_COMMIT"):
        return os.environ["ACB_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


async def bench(args) -> list[dict]:
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth() if device == "cuda" else float("nan")
    stamp = {
        "commit": _commit(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }
    results = []
    traces: dict[str, dict] = {}
    models: dict[str, tuple[torch.nn.Module, int]] = {}

    def record(r: dict) -> None:  # written after every run, so a cut-off run keeps what it measured
        r.update(stamp)
        results.append(r)
        print(_row(r), file=sys.stderr, flush=True)
        mask = r.get("mask_ms_per_step")
        if mask is not None and mask == mask:  # not NaN: a run with constrained requests
            print(f"  grammar masks: {mask:.3f} ms of host time per step", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    for name, workload_modes, traced in _plan(args):
        w = WORKLOADS[name].scaled(args.share_scale if name == "W-share" and args.share_scale else args.scale)
        if args.model:
            w = dataclasses.replace(w, model=args.model, note=(w.note + f" {args.model} model").strip())
        if w.model not in models:
            models.clear()
            gc.collect()
            torch.cuda.empty_cache() if device == "cuda" else None
            model = build_model(w.model, device)
            # counted now: acb's lean path later releases the unfused copies of the weights it fuses
            models[w.model] = (model, sum(p.numel() * p.element_size() for p in model.parameters()))
        model, weight_bytes = models[w.model]
        shape = ModelShape.from_config(model.config)
        tokenizer = synthetic_tokenizer(shape.vocab_size)
        requests = make_requests(w, shape.vocab_size, seed=args.seed)
        turns = _turn_lengths(requests)
        max_len = max(p + n for p, n in turns) + 16
        floor, floor_steps = decode_floor(
            weight_bytes, shape.kv_bytes_per_token(model.dtype), turns, bandwidth, min(len(turns), args.max_num_seqs)
        )
        # transformers' modes first: acb's lean path releases the unfused weights of the model it takes over
        modes = sorted(workload_modes, key=lambda m: not m.startswith("hf-"))
        for mode in modes:
            if mode.startswith("hf-"):
                if w.new is None or w.kind != "single":
                    print(f"skipping {mode} for {w.name}: generate_batch takes one output length", file=sys.stderr)
                    continue
                r = run_transformers(model, requests, use_async=mode == "hf-async")
                r.update(
                    workload=w.name, note=w.note, mode=mode, card=card, model=w.model, requests=w.requests,
                    gpu_idle=float("nan"), engine_build_s=0.0, fast_path=False, floor_s=floor,
                    achieved_vs_floor=floor / r["wall_s"], copy_bw_GBps=bandwidth / 1e9,
                )  # fmt: skip
                record(r)
                continue
            base, overrides = parse_mode(mode)
            tp = overrides.get("tensor_parallel_size", 1)  # each rank reads its share of the weights and KV
            shape_of_requests = {k: overrides.pop(k) for k in ("constrained", "penalties") if k in overrides}
            config = EngineConfig(**{
                "max_num_seqs": min(w.requests, args.max_num_seqs),
                "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": max_len,
                "overlap": base == "async", "overlap_depth": args.overlap_depth, "record_step_timing": device == "cuda",
                "cuda_graphs": not args.no_graphs, "fast_path": None if not args.generic else False, **overrides,
            })  # fmt: skip
            t_build = time.perf_counter()
            engine = Engine(model, tokenizer, config)
            build_s = time.perf_counter() - t_build
            async with engine:
                # warm-up: every kernel variant compiles here (prefill tiles for short and long prompts, decode); then
                # the prefix cache forgets the warm-up's prompts
                first = [_first_prompt(r) for r in requests[:2]]
                await run_one(engine, [(first[0], 4), (first[1][:16], 4)], **shape_of_requests)  # grammar compiled too
                engine.clear_prefix_cache()
                engine.clear_step_timing()
                steps_before = engine.stats().steps
                preempted_before = engine.stats().num_preemptions
                progress = None if args.no_progress else f"{w.name} {mode}"
                if traced:
                    engine.start_trace()
                masks = engine._runner.grammar_masks
                masks.fill_seconds, masks.fills = 0.0, 0
                with kernel_profile(args.kernels) as kernels:
                    r = await run_one(engine, requests, profile=args.profile, progress=progress, **shape_of_requests)
                if kernels:
                    r["kernels"] = kernels
                r["mask_ms_per_step"] = masks.fill_seconds * 1e3 / masks.fills if masks.fills else float("nan")
                if traced:
                    from .timeline import gap_summary

                    trace = traces.setdefault(w.name, {})[mode] = engine.stop_trace()
                    print(f"{w.name} {mode}: {gap_summary(trace)}", file=sys.stderr)
                r["steps"] -= steps_before
                r["preemptions"] = engine.stats().num_preemptions - preempted_before
                stats = engine.stats()
                r["prefix_cached_share"] = stats.prefix_cached_tokens / max(1, stats.prefix_queried_tokens)
                intervals = engine.step_intervals()
                durations = sorted(e - s for s, e in intervals)
                r["gpu_step_ms_p50"] = percentile(durations, 50) if durations else float("nan")
                r["step_kinds"] = step_kinds(intervals, engine.step_shapes())
                if args.step_kinds:
                    print(f"{w.name} {mode}: GPU time per kind of step", file=sys.stderr)
                    for kind, k in r["step_kinds"].items():
                        line = f"  {k['gpu_s']:7.2f} s {k['steps']:6d} steps {k['mean_ms']:7.2f} ms  {kind}"
                        print(line, file=sys.stderr)
                r["loop_cpu_ms_per_step"] = r["loop_thread_cpu_s"] * 1e3 / max(1, r["steps"])
                r.update(
                    workload=w.name, note=w.note, mode=mode, card=card, model=w.model, requests=w.requests,
                    gpu_idle=idle_fraction(intervals), engine_build_s=build_s, fast_path=engine.fast_path,
                    floor_s=floor / tp, achieved_vs_floor=floor / tp / r["wall_s"], copy_bw_GBps=bandwidth / 1e9,
                    floor_step_ms=floor * 1e3 / tp / max(1, floor_steps), path_reason=engine.path_reason,
                    weight_bytes=weight_bytes, tensor_parallel_size=tp,
                )  # fmt: skip
                record(r)  # before the engine closes: a close that hangs must not take the figures with it
            del engine
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if traced and w.name in traces:
            from .timeline import plot_timeline

            runs = traces[w.name]
            # sync above async; A/B rows below those, in run order
            drawn = [m for m in ("sync", "async") if m in runs] + [m for m in runs if m not in ("sync", "async")]
            ordered = {f"{m} — {w.name}, {card}": runs[m] for m in drawn}
            path = args.timeline.replace(".png", f"-{w.name}.png")
            plot_timeline(ordered, path)
            print(f"timeline: {path}", file=sys.stderr)
    return results


HEADER = (
    "| workload | mode | card | wall s | tok/s | GPU idle | TTFT p50/p99 ms | ITL p50/p99 ms | loop lag p50/p99 ms "
    "| achieved/floor | GPU ms/step p50 | loop CPU ms/step | preemptions |"
)


def _row(r: dict) -> str:
    def f(x: float, spec: str, scale: float = 1.0, unit: str = "") -> str:
        return "—" if x != x else f"{x * scale:{spec}}{unit}"  # NaN: not measured for this mode

    name = r["workload"] + (f" ({r['note']})" if r["note"] else "")
    return (
        f"| {name} | {r['mode']} | {r['card']} | {r['wall_s']:.2f} | {r['tok_per_s']:,.0f} | "
        f"{f(r['gpu_idle'], '.1f', 100, ' %')} | {f(r['ttft_p50_ms'], '.0f')} / {f(r['ttft_p99_ms'], '.0f')} | "
        f"{f(r['itl_p50_ms'], '.1f')} / {f(r['itl_p99_ms'], '.1f')} | "
        f"{f(r['loop_lag_p50_ms'], '.2f')} / {f(r['loop_lag_p99_ms'], '.2f')} | "
        f"{f(r['achieved_vs_floor'], '.0f', 100, ' %')} | {f(r['gpu_step_ms_p50'], '.2f')} | "
        f"{f(r['loop_cpu_ms_per_step'], '.2f')} | {f(r.get('preemptions', float('nan')), '.0f')} |"
    )


def table_markdown(results: list[dict]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count(" | ") + 1)]
    return "\n".join(lines + [_row(r) for r in results])


def ratios_markdown(results: list[dict]) -> str:
    """Same-run ratios: acb async over sync per workload, and acb async over transformers' CB modes."""
    by = {(r["workload"], r["mode"]): r["tok_per_s"] for r in results}
    lines = []
    for name in dict.fromkeys(r["workload"] for r in results):
        if (name, "async") not in by:
            continue
        variants = [(m, f"acb {m}") for (n, m) in by if n == name and "[" in m]
        parts = [f"{by[(name, 'async')] / by[(name, base)]:.2f}× {label}" for base, label in
                 (("sync", "acb sync"), ("hf-sync", "transformers CB sync"), ("hf-async", "transformers CB async"),
                  *variants)
                 if (name, base) in by]  # fmt: skip
        if parts:
            lines.append(f"- {name}: acb async = " + ", ".join(parts) + " (output tok/s, same run)")
    return "\n".join(lines)


def report_markdown(results: list[dict], command: str) -> str:
    """The table with its provenance (card, date, commit, command) and the same-run ratios."""
    first = results[0] if results else {}
    head = (
        f"Card: {first.get('card', '?')} · date: {first.get('date', '?')} · commit: {first.get('commit', '?')} · "
        f"torch {first.get('torch', '?')} · loop: {first.get('loop', '?')}\n\nCommand: `{command}`\n"
    )
    return head + "\n" + table_markdown(results) + "\n\n" + ratios_markdown(results) + "\n"


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), help="a named plan of workloads and modes (overrides both)")
    ap.add_argument("--workloads", default="W-side,W-small")
    ap.add_argument("--modes", default="async,sync", help="acb: async, sync; transformers CB: hf-sync, hf-async")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink outputs (and W-share's request count)")
    ap.add_argument("--share-scale", type=float, help="W-share's own --scale (its request count), e.g. 0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument(
        "--overlap-depth", type=int, default=2, help="steps launched ahead in async mode (see EngineConfig)"
    )
    ap.add_argument("--generic", action="store_true", help="force the generic transformers path")
    ap.add_argument(
        "--model",
        choices=["tiny", "qwen-0.5b", "llama-8b", *FAMILY_MODELS],
        help="run the workloads on this model instead",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the event-loop thread during each timed run")
    ap.add_argument("--kernels", type=int, default=0, help="profile each timed run's GPU kernels, print the top N")
    ap.add_argument("--step-kinds", action="store_true", help="print each run's GPU time per kind of step")
    ap.add_argument("--timeline", help="draw the stage/step timeline of each workload to this PNG path (suffixed)")
    ap.add_argument("--markdown", help="also write the table to this markdown file")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="uvloop" if _has_uvloop() else "asyncio",
        help="event loop (default: uvloop when installed, as acb.run does)",
    )
    args = ap.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        results = uvloop.run(bench(args))
    else:
        results = asyncio.run(bench(args))
    report = report_markdown(results, "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
