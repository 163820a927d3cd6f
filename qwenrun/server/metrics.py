"""Prometheus metrics of one app, in a registry of its own (two apps in a process never collide).

Request counters, latency histograms and token counters are updated as requests run; the engine
gauges (queue, running, KV cache use, prefix-cache hit rate, preemptions) are read from
`AsyncEngine.stats()` at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from qwenrun.engine.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        yield GaugeMetricFamily("qwenrun_num_requests_running", "Requests being decoded.",
                                value=stats.running)
        yield GaugeMetricFamily("qwenrun_num_requests_waiting", "Requests queued for admission.",
                                value=stats.waiting)
        total = stats.kv_blocks_total
        yield GaugeMetricFamily("qwenrun_kv_cache_usage_perc",
                                "Fraction of KV cache blocks in use (0 to 1).",
                                value=stats.kv_blocks_used / total if total else 0.0)
        yield GaugeMetricFamily("qwenrun_prefix_cache_hit_rate",
                                "Fraction of prompt tokens served from the prefix cache.",
                                value=float(getattr(stats, "prefix_cache_hit_rate", 0.0)))
        yield CounterMetricFamily("qwenrun_num_preemptions", "Requests preempted for KV space.",
                                  value=getattr(stats, "preemptions", 0))


class Metrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("qwenrun_http_requests", "HTTP requests by endpoint and status.",
                                     ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("qwenrun_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=r)
        self.generation_tokens = Counter("qwenrun_generation_tokens", "Generated tokens.",
                                         registry=r)
        self.finished = Counter("qwenrun_request_finished", "Finished generations by reason.",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("qwenrun_time_to_first_token_seconds",
                              "From request arrival to its first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qwenrun_inter_token_latency_seconds",
                             "Time between two generated tokens of a request.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("qwenrun_e2e_request_latency_seconds",
                             "From request arrival to its last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
