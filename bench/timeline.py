"""The timeline picture: each pipeline stage's host spans and the device's step spans, sync above async.

Gaps in the device lane are time the GPU waited for the host. In sync mode they line up with the host stages of
every step; in async mode the next step is already queued when one ends.
"""

from __future__ import annotations

from acb.tracing import LANES, Trace

from .metrics import busy_time

__all__ = ["device_idle", "gap_summary", "idle_gaps", "plot_timeline", "window"]

COLORS = {
    "admission": "#8c8c8c",
    "prepare": "#4c72b0",
    "launch": "#55a868",
    "wait": "#dddddd",
    "process": "#8172b2",
    "detokenize": "#ccb974",
    "device": "#c44e52",
}


def window(trace: Trace, first_step: int, steps: int) -> tuple[float, float]:
    """The time window covering device steps ``first_step .. first_step + steps`` (or the whole trace)."""
    dev = sorted(trace.lane("device"))
    if not dev:
        times = [t for _, s, e in trace.spans for t in (s, e)]
        return (min(times), max(times)) if times else (0.0, 1.0)
    first_step = min(first_step, len(dev) - 1)
    last = min(len(dev) - 1, first_step + steps - 1)
    return dev[first_step][0], dev[last][1]


def device_idle(trace: Trace, t0: float, t1: float) -> float:
    """Share of ``[t0, t1]`` in which no device step ran."""
    return 1.0 - busy_time(trace.lane("device"), t0, t1) / (t1 - t0) if t1 > t0 else 0.0


def idle_gaps(trace: Trace) -> list[tuple[int, float, float]]:
    """Every gap between consecutive device steps: ``(index of the step after it, start s from the first step,
    length s)``, in step order. Their sum is the idle time of the traced run."""
    dev = sorted(trace.lane("device"))
    out, edge = [], dev[0][1] if dev else 0.0
    for i, (s, e) in enumerate(dev[1:], start=1):
        if s > edge:
            out.append((i, edge - dev[0][0], s - edge))
        edge = max(edge, e)
    return out


def gap_summary(trace: Trace, top: int = 5) -> str:
    """One line: where the device waited (total, how often, the longest gaps and the step after each)."""
    gaps = idle_gaps(trace)
    if not gaps:
        return "no device gaps"
    total = sum(g for _, _, g in gaps)
    longest = sorted(gaps, key=lambda g: -g[2])[:top]
    parts = ", ".join(f"{g * 1e3:.2f} ms before step {i} (t={t:.2f} s)" for i, t, g in longest)
    return f"device idle {total * 1e3:.1f} ms in {len(gaps)} gaps; longest: {parts}"


def plot_timeline(
    traces: dict[str, Trace], path: str, title: str = "", windows: tuple[tuple[int, int], ...] = ((20, 200), (200, 12))
) -> None:
    """Draw the traces (in the given order: put sync first) once per window of ``(first_step, steps)`` device steps:
    by default a few hundred steps, then a close-up of twenty, to ``path``. Each panel names its device idle share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, trace, w) for w in windows for name, trace in traces.items()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(16, 2.3 * len(panels)), squeeze=False)
    for ax, (name, trace, (first_step, steps)) in zip(axes[:, 0], panels):
        t0, t1 = window(trace, first_step, steps)
        for row, lane in enumerate(reversed(LANES)):
            bars = [(s - t0, e - s) for s, e in trace.lane(lane) if e >= t0 and s <= t1]
            ax.broken_barh([(x * 1e3, w * 1e3) for x, w in bars], (row + 0.1, 0.8), color=COLORS[lane])
        ax.set_yticks([r + 0.5 for r in range(len(LANES))], list(reversed(LANES)))
        ax.set_xlim(0, (t1 - t0) * 1e3)
        ax.set_ylim(0, len(LANES))
        n = len([1 for s, e in trace.lane("device") if s >= t0 and e <= t1])
        idle = device_idle(trace, t0, t1)
        ax.set_title(f"{name} — {n} steps, device idle {idle:.1%} of this window", loc="left", fontsize=10)
        ax.set_xlabel("ms")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
