"""All-reduce latency between the GPUs of this host, per size: NCCL (eager, and inside a CUDA graph) against acb's
one-shot kernel (:mod:`acb.parallel.allreduce`, eager and inside a graph), through acb's own process group. First
checks the one-shot's sums: every rank gets the same bits, equal to a float32 sum of the inputs rounded to bf16.

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
    from acb.parallel.group import Group, host_store

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
    one, pg = group.one_shot, group._pg
    rows = []
    for r_, h in SIZES:
        gen = [torch.Generator(device).manual_seed(s) for s in range(world)]
        xs = [torch.randn(r_, h, device=device, generator=g).to(torch.bfloat16) for g in gen]
        want = sum(x.float() for x in xs).to(torch.bfloat16)
        row = {"rows": r_, "hidden": h, "bytes": r_ * h * 2, "world": world}
        t = xs[rank].clone()
        fits = one is not None and one.fits(t)
        if fits:
            one(t)
            torch.cuda.synchronize(device)
            everyone = group.all_gather_last(t.view(1, -1)).view(world, -1)
            row["one_shot_same_bits_on_every_rank"] = bool((everyone == everyone[0]).all())
            row["one_shot_max_err"] = float((t.float() - want.float()).abs().max())
        buf = xs[rank].clone()
        row["nccl_eager_us"] = _time(lambda b=buf: pg.allreduce([b]).wait(), device, False)
        row["nccl_graph_us"] = _time(lambda b=buf: pg.allreduce([b]).wait(), device, True)
        if fits:
            row["one_shot_eager_us"] = _time(lambda b=buf: one(b), device, False)
            row["one_shot_graph_us"] = _time(lambda b=buf: one(b), device, True)
        rows.append(row)
    if rank == 0:
        nan = float("nan")
        print("| rows x hidden | bytes | NCCL eager µs | NCCL graph µs | one-shot eager µs | one-shot graph µs "
              "| same bits | max err |", file=sys.stderr)  # fmt: skip
        for row in rows:
            print(f"| {row['rows']} x {row['hidden']} | {row['bytes']} | {row['nccl_eager_us']:.1f} | "
                  f"{row['nccl_graph_us']:.1f} | {row.get('one_shot_eager_us', nan):.1f} | "
                  f"{row.get('one_shot_graph_us', nan):.1f} | {row.get('one_shot_same_bits_on_every_rank', '-')} | "
                  f"{row.get('one_shot_max_err', nan):.3g} |", file=sys.stderr)  # fmt: skip
        if out:
            with open(out, "w") as f:
                json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
        for p in procs:
            p.join(30)
    group.close(True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    _rank(0, args.world, 0, args.json)


if __name__ == "__main__":
    main()
