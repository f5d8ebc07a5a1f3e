"""Timeline tracing: host spans of each pipeline stage and the device's step spans, for the benchmark's timeline
picture (``bench/timeline.py``).

Off by default. When on, a span costs two ``perf_counter`` calls and a tuple append. Times are host
``perf_counter`` seconds; CUDA step spans are mapped onto that clock from their events (see
:meth:`acb.Engine.stop_trace`). :class:`StepTimer` is the device's side: CUDA events around each step's GPU work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["LANES", "StepTimer", "Trace", "Tracer"]

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


class _HostMark:
    """On the CPU, where a step's compute runs in the worker thread as it is launched, a host clock reading stands in
    for a CUDA event: the same ``record`` / ``synchronize`` / ``elapsed_time`` (ms)."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: _HostMark) -> float:
        return (other.t - self.t) * 1e3


class StepTimer:
    """The launch stage's step timing. With ``record`` (``EngineConfig.record_step_timing``), a pair of CUDA events
    (host clock readings on the CPU) brackets every (sub-)step's GPU work, kept with the step's shape ``(rows, tokens,
    replayed a decode graph)``: benchmarks read GPU busy intervals and GPU time per kind of step from them. While a
    trace runs, the steps' spans go onto the host clock (:meth:`start_trace`); on the CPU, the worker's compute spans
    stand in."""

    def __init__(self, device: torch.device, record: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event, tuple[int, int, bool]]] | None = (
            [] if record else None
        )
        self.cpu_spans: list[tuple[float, float]] | None = None  # worker compute spans (CPU) while tracing
        self._trace_from: int | None = None  # index into events (CUDA) where a trace started
        self._trace_ref: tuple[torch.cuda.Event, float] | None = None

    def begin(self) -> torch.cuda.Event | None:
        """A start event for the next (sub-)step when recording (the caller records it where the step's GPU work
        starts), else None."""
        return self._mark() if self.events is not None else None

    def end(self, start: torch.cuda.Event | None, shape: tuple[int, int, bool]) -> None:
        """Mark the end of a (sub-)step's GPU work, paired with ``start`` (from :meth:`begin`)."""
        if start is not None:
            end = self._mark()
            end.record()
            self.events.append((start, end, shape))

    def _mark(self) -> torch.cuda.Event | _HostMark:
        return torch.cuda.Event(enable_timing=True) if self.cuda else _HostMark()

    def clear(self) -> None:
        """Forget the steps recorded so far (a benchmark's warm-up)."""
        if self.events is not None:
            self.events.clear()

    def start_trace(self) -> None:
        if self.cuda:
            if self.events is None:
                raise RuntimeError("tracing on CUDA needs EngineConfig(record_step_timing=True)")
            torch.cuda.synchronize(self.device)
            ref = torch.cuda.Event(enable_timing=True)
            ref.record()
            ref.synchronize()
            self._trace_ref = (ref, time.perf_counter())  # the GPU was idle: ref ran at about this host time
            self._trace_from = len(self.events)
        else:
            self.cpu_spans = []

    def stop_trace(self) -> list[tuple[float, float]]:
        """The steps' spans since :meth:`start_trace`, in host ``perf_counter`` seconds (waits for their events)."""
        if not self.cuda:
            spans, self.cpu_spans = self.cpu_spans or [], None
            return spans
        if self._trace_ref is None:
            return []
        ref, t_ref = self._trace_ref
        out = []
        for start, end, _ in self.events[self._trace_from :]:
            end.synchronize()
            out.append((t_ref + ref.elapsed_time(start) / 1e3, t_ref + ref.elapsed_time(end) / 1e3))
        self._trace_ref = None
        return out

    def intervals(self) -> list[tuple[float, float]]:
        """GPU busy intervals ``(start_ms, end_ms)`` of every (sub-)step so far, relative to the first. Synchronizes
        on the recorded events."""
        events = self.events or []
        if not events:
            return []
        first = events[0][0]
        first.synchronize()
        out = []
        for start, end, _ in events:
            end.synchronize()
            out.append((first.elapsed_time(start), first.elapsed_time(end)))
        return out

    def shapes(self) -> list[tuple[int, int, bool]]:
        """Beside each of :meth:`intervals`: the (sub-)step's rows, tokens, and whether it replayed a graph."""
        return [shape for _, _, shape in self.events or []]
