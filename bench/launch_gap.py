"""What one more kernel costs a CUDA graph: µs per launch of chains of small kernels, each launched after the last.

A decode step is ~150 kernels in one graph (docs/benchmarks.md, session 23), and the profiler shows the step longer
than its kernels' sum by ~0.7 µs per kernel. This measures that cost directly, on kernels that do (almost) nothing:

- ``one program``: one program storing one value;
- ``two per SM``: two programs per SM, each loading and storing 16 bytes (the grid of the engine's small kernels);
- ``1 MB copy``: two programs per SM copying 1 MB between them (a norm's or an argmax's traffic).

Each chain of ``--launches`` kernels is captured in one CUDA graph and replayed (median of 5), so the figure is the
interval between two kernels' starts: the kernel's own time plus the gap the graph leaves between them::

    python -m bench.launch_gap --launches 150 --json out.json
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from .gemm import _time, card_and_bandwidth, write_json


@triton.jit
def _touch_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=150)
    ap.add_argument("--json")
    args = ap.parse_args()
    card, bandwidth = card_and_bandwidth(ap)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.zeros(1 << 20, dtype=torch.float32, device="cuda")
    y = torch.zeros_like(x)
    mb = (1 << 20) // 4  # 1 MB of float32, read and written
    variants = {
        "one program": lambda i: _touch_kernel[(1,)](x, y, 1, BLOCK=16),
        "two per SM": lambda i: _touch_kernel[(2 * sms,)](x, y, 8 * sms, BLOCK=4),
        "1 MB copy": lambda i: _touch_kernel[(2 * sms,)](x, y, mb, BLOCK=triton.next_power_of_2(mb // (2 * sms))),
    }
    rows = [dict(variant=name, us_per_launch=_time(fn, args.launches)) for name, fn in variants.items()]
    print(f"{card}, chains of {args.launches} launches in one CUDA graph")
    print("| kernel | µs per launch |\n|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['us_per_launch']:.2f} |")
    if args.json:
        write_json(args.json, card, bandwidth, [dict(r, launches=args.launches) for r in rows])


if __name__ == "__main__":
    main()
