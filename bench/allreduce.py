"""All-reduce latency between the GPUs of this host, per size: NCCL (eager, and inside a CUDA graph) against acb's
one-shot kernel (:mod:`acb.parallel.allreduce`, eager and inside a graph), through acb's own process group. First
checks the one-shot's sums: every rank gets the same bits, equal to a float32 sum of the inputs rounded to bf16.
``push-atomics`` is the push kernel signalling with Triton's atomics instead of inline PTX. Then a decode step's
logits gather (rows x the vocabulary, each rank its slice): NCCL against the one-shot gather, in graphs.

    python -m bench.allreduce --world 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time

import torch

SIZES = [(1, 4096), (32, 4096), (32, 8192), (128, 8192), (512, 8192)]
GATHERS = [(32, 128256), (64, 128256)]  # rows x the whole vocabulary (Llama 3)
CALLS = 64


def _time(fn, device, graph: bool) -> float:
    """µs per call of ``fn`` (CALLS calls per measurement, the median of 5)."""
    torch.cuda.synchronize(device)
    if graph:
        fn()  # warm
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(CALLS):
                fn()
        run = g.replay
    else:

        def run():
            for _ in range(CALLS):
                fn()

    run()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) / CALLS * 1e6)
    return sorted(times)[2]


def _rank(rank: int, world: int, port: int, out=None) -> None:
    import os

    from acb.parallel.allreduce import setup_one_shot
    from acb.parallel.group import ONE_SHOT_GATHER_BYTES, ONE_SHOT_MAX_BYTES, Group, host_store

    os.environ["ACB_ALLREDUCE"] = "nccl"  # the group's own sums: NCCL; the one-shot variants are set up here
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    if rank == 0:
        store = host_store(world, 120)
        port = store.port
        procs = [multiprocessing.get_context("spawn").Process(target=_rank, args=(r, world, port)) for r in
                 range(1, world)]  # fmt: skip
        for p in procs:
            p.start()
        group = Group(store, 0, world, device, 120)
    else:
        group = Group.join(port, rank, world, device, 120)
    variants = {}
    for m in MODES:  # push-atomics: the push kernel signalling with Triton's atomics instead of inline PTX
        os.environ["ACB_ONE_SHOT_ASM"] = "0" if m.endswith("-atomics") else "1"
        variants[m] = setup_one_shot(group.store, rank, world, device, ONE_SHOT_MAX_BYTES, m.split("-")[0], tag=m,
                                     gather_bytes=ONE_SHOT_GATHER_BYTES)  # fmt: skip
    os.environ.pop("ACB_ONE_SHOT_ASM")
    pg = group._pg
    rows = []
    for r_, h in SIZES:
        gen = [torch.Generator(device).manual_seed(s) for s in range(world)]
        xs = [torch.randn(r_, h, device=device, generator=g).to(torch.bfloat16) for g in gen]
        want = sum(x.float() for x in xs).to(torch.bfloat16)
        row = {"rows": r_, "hidden": h, "bytes": r_ * h * 2, "world": world}
        buf = xs[rank].clone()
        row["nccl_eager_us"] = _time(lambda b=buf: pg.allreduce([b]).wait(), device, False)
        row["nccl_graph_us"] = _time(lambda b=buf: group._now().allreduce([b]).wait(), device, True)
        for mode, one in variants.items():
            if one is None or not one.fits(buf):
                continue
            t = xs[rank].clone()
            one(t)
            torch.cuda.synchronize(device)
            everyone = group.all_gather_last(t.view(1, -1)).view(world, -1)
            row[f"{mode}_same_bits"] = bool((everyone == everyone[0]).all())
            row[f"{mode}_max_err"] = float((t.float() - want.float()).abs().max())
            row[f"{mode}_eager_us"] = _time(lambda b=buf, o=one: o(b), device, False)
            row[f"{mode}_graph_us"] = _time(lambda b=buf, o=one: o(b), device, True)
        rows.append(row)
    gathers = []
    for r_, v in GATHERS:  # a decode step's logits: rows x this rank's slice of the vocabulary
        cols = v // world
        x = torch.randn(r_, cols, device=device).to(torch.bfloat16) + rank
        want = group.all_gather_last(x)  # NCCL (this group has no one-shot kernel)
        row = {"rows": r_, "cols": cols, "bytes": x.numel() * 2, "world": world}
        row["nccl_graph_us"] = _time(lambda a=x: group.all_gather_last(a), device, True)
        for mode, one in variants.items():
            if one is None or not one.fits_gather(x):
                continue
            row[f"{mode}_same"] = bool(torch.equal(one.gather_last(x), want))
            row[f"{mode}_graph_us"] = _time(lambda a=x, o=one: o.gather_last(a), device, True)
        gathers.append(row)
    if rank == 0:
        nan = float("nan")
        print("| world | rows x hidden | bytes | NCCL eager / graph µs | pull eager / graph µs | push eager / graph µs "
              "| exact (pull, push) |", file=sys.stderr)  # fmt: skip
        for row in rows:
            us = [
                f"{row.get(f'{k}_eager_us', nan):.1f} / {row.get(f'{k}_graph_us', nan):.1f}" for k in ("nccl", *MODES)
            ]
            errs = ", ".join(f"{row.get(f'{m}_max_err', nan):.3g}" for m in MODES)
            print(f"| {world} | {row['rows']} x {row['hidden']} | {row['bytes']} | {' | '.join(us)} | {errs} |",
                  file=sys.stderr)  # fmt: skip
        print("| world | gather rows x cols | bytes per rank | NCCL graph µs | "
              + " | ".join(f"{m} graph µs (equal)" for m in MODES) + " |", file=sys.stderr)  # fmt: skip
        for row in gathers:
            us = [f"{row.get(f'{m}_graph_us', nan):.1f} ({row.get(f'{m}_same')})" for m in MODES]
            print(f"| {world} | {row['rows']} x {row['cols']} | {row['bytes']} | {row['nccl_graph_us']:.1f} | "
                  f"{' | '.join(us)} |", file=sys.stderr)  # fmt: skip
        choice = _choose(rows)
        print(f"choice for {world} GPUs: {choice}", file=sys.stderr)
        if out:
            with open(out, "w") as f:
                json.dump({"card": torch.cuda.get_device_name(), "choice": choice, "rows": rows, "gathers": gathers}, f,
                          indent=2)  # fmt: skip
        for p in procs:
            p.join(30)
    group.close(True)


MODES = ("pull", "push", "push-atomics")


def _choose(rows: list[dict]) -> str:
    """The variant for a decode step's sums (32 rows): the exact one-shot variant fastest in a graph, if it beats
    NCCL there; else ``nccl`` (``push-atomics`` counts as ``push``: the signal's form is not a variant to choose)."""
    best, best_us = "nccl", min(r["nccl_graph_us"] for r in rows if r["rows"] == 32)
    for mode in MODES:
        times = [r.get(f"{mode}_graph_us") for r in rows if r["rows"] == 32]
        exact = all(r.get(f"{mode}_same_bits") and r.get(f"{mode}_max_err") == 0 for r in rows if r["rows"] == 32)
        if exact and None not in times and max(times) < best_us:
            best, best_us = mode, max(times)
    return best.split("-")[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    _rank(0, args.world, 0, args.json)


if __name__ == "__main__":
    main()
