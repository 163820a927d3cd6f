"""Prometheus metrics of one app, in a registry of its own (two apps in a process never collide).

Request counters, latency histograms and token counters are updated as requests run; the engine
gauges (queue, running, KV cache use, prefix-cache hit rate, preemptions) are read from
`AsyncEngine.stats()` at scrape time, so they are never stale. With speculative decoding, vLLM's
`spec_decode` counters (drafts, draft tokens, accepted tokens, accepted per draft position) and two
gauges derived from them (acceptance rate, mean acceptance length) are read from the scheduler.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from qwenrun.engine.async_engine import AsyncEngine
    from qwenrun.engine.scheduler import Scheduler
    from qwenrun.spec_decode.policy import DraftPolicy

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
        if self.engine.engine.speculative_config is not None:
            yield from _spec_decode(self.engine.engine.scheduler)


def _spec_decode(scheduler: Scheduler) -> Iterator[Metric]:
    """vLLM's names (`vllm:spec_decode_*`); mean acceptance length counts the sampled token too, as
    vLLM's log line does: 1 + accepted / drafts."""
    drafted, accepted = scheduler.stats.draft_tokens, scheduler.stats.accepted_tokens
    yield CounterMetricFamily("qwenrun_spec_decode_num_draft_tokens", "Draft tokens verified.", value=drafted)
    yield CounterMetricFamily("qwenrun_spec_decode_num_accepted_tokens", "Draft tokens accepted.", value=accepted)
    yield GaugeMetricFamily("qwenrun_spec_decode_draft_acceptance_rate",
                            "Accepted draft tokens / verified draft tokens, since start.",
                            value=accepted / drafted if drafted else 0.0)
    policy: DraftPolicy | None = getattr(scheduler, "policy", None)  # the adaptive draft length's counters
    if policy is None:
        return
    yield CounterMetricFamily("qwenrun_spec_decode_num_drafts", "Steps in which a request had drafts verified.",
                              value=policy.num_drafts)
    per_pos = CounterMetricFamily("qwenrun_spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted, by their position in the draft.", labels=["position"])
    for position, count in enumerate(policy.accepted_per_position):
        per_pos.add_metric([str(position)], count)
    yield per_pos
    yield GaugeMetricFamily("qwenrun_spec_decode_mean_acceptance_length",
                            "Tokens a verified draft yields (1 + accepted per draft), since start.",
                            value=1 + accepted / policy.num_drafts if policy.num_drafts else 0.0)


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
        self.finished = Counter("qwenrun_request_finished", "Finished generations by reason (\"error\": the "
                                "engine failed or refused it).", ["finish_reason"], registry=r)
        self.aborted = Counter("qwenrun_requests_aborted", "Admitted requests cancelled before they finished "
                               "(client gone, stop pressed, a sibling choice failed).", registry=r)
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
