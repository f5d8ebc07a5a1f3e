"""Timeline tracing: host spans of each pipeline stage and the device's step spans, for the benchmark's timeline
picture (``bench/timeline.py``).

Off by default. When on, a span costs two ``perf_counter`` calls and a tuple append. Times are host
``perf_counter`` seconds; CUDA step spans are mapped onto that clock from their events (see
:meth:`acb.Engine.stop_trace`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LANES", "Trace", "Tracer"]

LANES = ("admission", "prepare", "launch", "wait", "process", "detokenize", "device")
"""Host stages in pipeline order, then the device (GPU work of each step; on the CPU, the worker's compute)."""


@dataclass
class Trace:
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (lane, start_s, end_s)

    def lane(self, name: str) -> list[tuple[float, float]]:
        return [(s, e) for lane, s, e in self.spans if lane == name]


class Tracer:
    def __init__(self, max_spans: int = 500_000) -> None:
        self.enabled = False
        self.max_spans = max_spans
        self.trace = Trace()

    def start(self) -> None:
        self.trace = Trace()
        self.enabled = True

    def stop(self) -> Trace:
        self.enabled = False
        return self.trace

    def add(self, lane: str, start: float, end: float) -> None:
        if self.enabled and len(self.trace.spans) < self.max_spans:
            self.trace.spans.append((lane, start, end))
