"""Prometheus metrics of a served engine, in a registry of the app's own (several apps may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..engine import Engine

__all__ = ["ServerMetrics"]


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
