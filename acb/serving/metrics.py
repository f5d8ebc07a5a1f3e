"""Prometheus metrics of a served engine, in a registry of the app's own (several apps may share a process).

With API processes (:mod:`.processes`) each process counts its own HTTP requests, tokens and TTFT, and whichever
process a scrape reaches would answer with its own counts only: counters that jump between processes' values, which
Prometheus reads as resets. So each API process sends its counts to the engine's process (:meth:`ServerMetrics.
snapshot`, with the engine's state reports, and on every scrape), which keeps every process's latest (a process that
ends keeps its last), and a scrape answers with their sum (:func:`merge`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Metric
from prometheus_client.core import GaugeMetricFamily

from ..engine import Engine
from ..errors import AcbError

__all__ = ["ServerMetrics", "merge"]

Snapshot = list[tuple[str, str, str, list[tuple[str, tuple, float]]]]
"""Metric families as plain data: ``(name, documentation, type, [(sample name, labels, value), ...])``."""


class _EngineCollector:
    """Reads queue depth and KV usage from ``engine.stats()`` at scrape time (no background task)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for name, doc, value in (
            ("acb_requests_running", "Sequences in the running batch", s.num_running),
            ("acb_requests_waiting", "Requests admitted and waiting for a batch slot (queue depth)", s.num_waiting),
            ("acb_requests_pending", "Requests waiting for room in the admission queue (max_pending)", s.num_pending),
            ("acb_kv_blocks_total", "KV-cache blocks in the pool", s.kv_blocks_total),
            ("acb_kv_blocks_free", "Free KV-cache blocks", s.kv_blocks_free),
            ("acb_kv_usage_ratio", "Share of KV-cache blocks in use", 1 - s.kv_blocks_free / s.kv_blocks_total),
            ("acb_preemptions", "Sequences preempted so far (recomputed later)", s.num_preemptions),
            ("acb_engine_steps", "Model steps launched so far", s.steps),
            ("acb_prefix_cache_queries", "Requests that looked up their prompt in the prefix cache", s.prefix_queries),
            ("acb_prefix_cache_hits", "Requests that found at least one cached block", s.prefix_hits),
            ("acb_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", s.prefix_queried_tokens),
            ("acb_prefix_cache_cached_tokens", "Prompt tokens the prefix cache held", s.prefix_cached_tokens),
            ("acb_prefix_cache_evictions", "Cached blocks reused for new content", s.prefix_evictions),
            ("acb_prefix_cache_blocks", "Blocks the prefix cache holds now", s.prefix_cached_blocks),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "acb_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("acb_prompt_tokens", "Prompt tokens admitted", registry=self.registry)
        self.generated_tokens = Counter("acb_generated_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram(
            "acb_time_to_first_token_seconds",
            "Time from request arrival to its first token",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))
        if hasattr(engine, "share_counters"):  # an API process: its counts go to the engine's process
            engine.share_counters(self.snapshot)

    def snapshot(self) -> Snapshot:
        """This app's own counts (HTTP requests, tokens, TTFT), as plain data to send to the engine's process."""
        return [
            (m.name, m.documentation, m.type, [(x.name, tuple(sorted(x.labels.items())), x.value) for x in m.samples
                                               if not x.name.endswith("_created")])  # times, which do not add up
            for metric in (self.requests, self.prompt_tokens, self.generated_tokens, self.ttft)
            for m in metric.collect()
        ]  # fmt: skip

    async def exported(self) -> CollectorRegistry:
        """What a scrape answers: this registry, or for an API process the counts of every API process summed (with
        the engine's gauges as this process last heard them)."""
        share = getattr(self.engine, "server_counters", None)
        if share is None:
            return self.registry
        try:
            counts = await share(self.snapshot())
        except AcbError:  # the engine's process is gone: this process's own counts are all there is
            return self.registry
        registry = CollectorRegistry()
        registry.register(_Families(counts))
        registry.register(_EngineCollector(self.engine))
        return registry


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """Several processes' counts as one: each sample summed over the processes that have it."""
    families: dict[str, tuple[str, str, dict]] = {}
    for snapshot in snapshots:
        for name, doc, kind, samples in snapshot:
            sums = families.setdefault(name, (doc, kind, {}))[2]
            for sample, labels, value in samples:
                sums[(sample, labels)] = sums.get((sample, labels), 0.0) + value
    return [(name, doc, kind, [(s, labels, v) for (s, labels), v in sums.items()])
            for name, (doc, kind, sums) in families.items()]  # fmt: skip


class _Families:
    """A :data:`Snapshot` as a collector."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self):
        for name, doc, kind, samples in self.snapshot:
            metric = Metric(name, doc, kind)
            for sample, labels, value in samples:
                metric.add_sample(sample, dict(labels), value)
            yield metric
