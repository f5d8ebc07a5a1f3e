"""The model-family table: each family of ``FAMILY_MODELS`` on the lean path and on the generic path, same run.

Every family runs W-family (32 × 256 → 512, random bf16 weights) in its own ``bench.run`` process, lean path
(``async``) then generic path (``async[fast_path=false]``), and the table compares them with the family's
weight-reading floor per decode step (its weights plus the batch's KV read once, at the card's measured copy
bandwidth)::

    python -m bench.families --out results/             # on the card: runs every family, writes the table
    python -m bench.families --table results/*.json     # the table again from saved results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .workloads import FAMILY_MODELS

MODES = "async,async[fast_path=false]"


def run_family(model: str, out: str, timeout: float) -> str:
    path = os.path.join(out, f"family-{model}.json")
    cmd = [sys.executable, "-m", "bench.run", "--no-progress", "--workloads", "W-family", "--model", model,
           "--modes", MODES, "--json", path]  # fmt: skip
    subprocess.run(cmd, timeout=timeout, check=True, stdout=subprocess.DEVNULL)
    return path


def table(results: list[dict]) -> str:
    """One row per family, from ``bench.run`` results of W-family in both modes."""
    by = {}
    for r in results:
        by.setdefault(r["model"], {})["generic" if "fast_path=false" in r["mode"] else "lean"] = r
    lines = [
        "| family (shape) | card | lean tok/s | generic tok/s | generic / lean | lean GPU ms/step | "
        "generic GPU ms/step | floor ms/step | lean step / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, runs in by.items():
        lean, generic = runs.get("lean"), runs.get("generic")
        first = lean or generic
        card = first["card"]

        def f(r, key, spec):
            return "—" if r is None or r.get(key) is None or r[key] != r[key] else f"{r[key]:{spec}}"

        ratio = "—" if not (lean and generic) else f"{generic['tok_per_s'] / lean['tok_per_s']:.0%}"
        over = "—" if lean is None else f"{lean['gpu_step_ms_p50'] / lean['floor_step_ms']:.2f}×"
        lines.append(
            f"| {model} | {card} | {f(lean, 'tok_per_s', ',.0f')} | {f(generic, 'tok_per_s', ',.0f')} | {ratio} | "
            f"{f(lean, 'gpu_step_ms_p50', '.2f')} | {f(generic, 'gpu_step_ms_p50', '.2f')} | "
            f"{f(first, 'floor_step_ms', '.2f')} | {over} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="run every family (one process each) and write its results here")
    ap.add_argument("--models", default=",".join(FAMILY_MODELS), help="comma-separated names of FAMILY_MODELS")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per family")
    ap.add_argument("--table", nargs="*", default=[], help="saved bench.run JSON results to tabulate")
    args = ap.parse_args(argv)
    paths = list(args.table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for model in args.models.split(","):
            try:
                paths.append(run_family(model, args.out, args.timeout))
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                print(f"{model}: {exc}", file=sys.stderr)
    results = []
    for path in paths:
        with open(path) as f:
            results += json.load(f)
    print(table(results))


if __name__ == "__main__":
    main()
