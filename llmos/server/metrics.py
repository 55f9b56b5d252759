"""Prometheus metrics, in a registry of the app's own (so two apps in one process never clash).

Counters and latency histograms are fed by the routes as outputs arrive; the engine gauges are
read at scrape time from the snapshot the engine thread publishes after each step
(`AsyncEngine.stats()`), never from live engine state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmos.engine.sequence import RequestOutput
from llmos.engine.stats import EngineStats

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_GAUGES = {
    "num_requests_running": "Sequences in the engine's running batch.",
    "num_requests_waiting": "Sequences waiting for a place in the batch.",
    "kv_blocks_used": "KV cache blocks in use.",
    "kv_blocks_total": "KV cache blocks in all.",
    "kv_blocks_pinned": "KV cache blocks pinned for agents waiting on a tool.",
    "kv_blocks_orphaned": "KV cache blocks in use yet held by no live request or pin (a leak).",
}


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats().as_dict()
        for key, doc in _GAUGES.items():
            yield GaugeMetricFamily(f"llmos_{key}", doc, value=stats[key])
        yield CounterMetricFamily(
            "llmos_num_preemptions",
            "Sequences preempted for KV room.",
            value=stats.get("num_preemptions", 0),
        )
        yield CounterMetricFamily(
            "llmos_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            value=stats.get("prefix_cache_queries", 0),
        )
        yield CounterMetricFamily(
            "llmos_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not recomputed).",
            value=stats.get("prefix_cache_hits", 0),
        )


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmos_requests", "HTTP requests by status (499: client left).", ["status"], registry=r
        )
        self.prompt_tokens = Counter("llmos_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("llmos_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "llmos_time_to_first_token_seconds",
            "Arrival to first token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llmos_inter_token_latency_seconds",
            "Time between a request's successive outputs.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(stats))

    def count(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Latencies and token counts of one engine request, observed as its outputs arrive."""

    __slots__ = ("_metrics", "_arrival", "_last", "_prompt", "_generated")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._arrival = time.monotonic()
        self._last: float | None = None
        self._prompt = 0
        self._generated = 0

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        generated = sum(len(o.token_ids) for o in out.outputs)
        if generated > self._generated:
            if self._last is None:
                self._metrics.ttft.observe(now - self._arrival)
            else:
                self._metrics.itl.observe(now - self._last)
            self._last = now
        self._prompt = len(out.prompt_token_ids)
        self._generated = generated

    def close(self) -> None:
        """Count the tokens once, whether the request finished, failed or was dropped."""
        self._metrics.prompt_tokens.inc(self._prompt)
        self._metrics.generation_tokens.inc(self._generated)
        self._prompt = self._generated = 0
