"""Prometheus metrics, in a registry of the app's own (so two apps in one process never clash).

Three vocabularies over the same observations: llmos's own (`llmos_*`), the OpenTelemetry GenAI
histograms (`gen_ai.server.*` and `gen_ai.client.token.usage`, named as OTel's Prometheus
exporter writes them), and vLLM's (`vllm:*`), so dashboards built for vLLM work unchanged.
Counters and latency histograms are fed by the routes as outputs arrive; the engine gauges are
read at scrape time from the snapshot the engine thread publishes after each step
(`AsyncEngine.stats()`), never from live engine state. Kernel metrics: `metrics_kernel`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmos.engine.sequence import RequestOutput
from llmos.engine.stats import EngineStats
from llmos.kernel.trace import PROVIDER
from llmos.server import tracing
from llmos.server.metrics_kernel import KernelCollector

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
# the GenAI semantic conventions' advised boundaries
_GENAI_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
_GENAI_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_GENAI_DURATION = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)
_GENAI_TOKENS = tuple(4**i for i in range(14))  # 1, 4, 16, ... 67108864
_GENAI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
_GAUGES = {
    "num_requests_running": "Sequences in the engine's running batch.",
    "num_requests_waiting": "Sequences waiting for a place in the batch.",
    "kv_blocks_used": "KV cache blocks in use.",
    "kv_blocks_total": "KV cache blocks in all.",
    "kv_blocks_pinned": "KV cache blocks pinned for agents waiting on a tool.",
    "kv_blocks_orphaned": "KV cache blocks in use yet held by no live request or pin (a leak).",
}
_SPEC = {
    "spec_decode_num_drafts": ("spec_num_drafts", "Verification steps that carried drafts."),
    "spec_decode_num_draft_tokens": ("spec_num_draft_tokens", "Draft tokens verified."),
    "spec_decode_num_accepted_tokens": ("spec_num_accepted_tokens", "Draft tokens accepted."),
}
PIN_TIMEOUT = 1.0  # seconds to wait for the engine thread's per-pin block counts


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model: Callable[[], str]) -> None:
        self._stats = stats
        self._model = model
        self.pins: dict[str, int] = {}  # retain key -> blocks, fetched before each render

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats().as_dict()
        for key, doc in _GAUGES.items():
            yield GaugeMetricFamily(f"llmos_{key}", doc, value=stats[key])
        counters = {
            "num_preemptions": "Sequences preempted for KV room.",
            "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
            "prefix_cache_hits": "Prompt tokens found in the prefix cache (not recomputed).",
        }
        for key, doc in counters.items():
            yield CounterMetricFamily(f"llmos_{key}", doc, value=stats.get(key, 0))
        # vLLM's names, labelled as vLLM labels them
        labels, value = ["model_name"], [self._model()]
        for key in ("num_requests_running", "num_requests_waiting"):
            g = GaugeMetricFamily(f"vllm:{key}", _GAUGES[key], labels=labels)
            g.add_metric(value, stats[key])
            yield g
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", labels=labels
        )
        usage.add_metric(value, stats["kv_blocks_used"] / max(1, stats["kv_blocks_total"]))
        yield usage
        for key, doc in counters.items():
            c = CounterMetricFamily(f"vllm:{key}", doc, labels=labels)
            c.add_metric(value, stats.get(key, 0))
            yield c
        for name, (key, doc) in _SPEC.items():  # speculative decoding (engine/spec.py)
            c = CounterMetricFamily(f"vllm:{name}", doc, labels=labels)
            c.add_metric(value, stats.get(key, 0))
            yield c
        pinned = GaugeMetricFamily(
            "llmos_kernel_kv_blocks_pinned",
            "KV cache blocks pinned for a process waiting on a tool, by process.",
            labels=["pid"],
        )
        for key, blocks in sorted(self.pins.items()):
            if key.startswith("p") and key[1:].isdigit():  # the kernel's key (loop.retain_key)
                pinned.add_metric([key[1:]], blocks)
        yield pinned


def _pins(engine: Any) -> dict[str, int]:
    """On the engine thread: blocks held under each retain key (the kernel's key: p{pid})."""
    return engine.blocks.pin_sizes()


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], model: str = "") -> None:
        self.registry = CollectorRegistry()
        self.model = model
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
        self.genai = _GenAI(r)
        self.vllm = _VLLM(r)
        self._engine = _EngineCollector(stats, lambda: self.model)
        r.register(self._engine)
        self.kernel: KernelCollector | None = None

    def watch_kernel(self, db: str) -> None:
        """Export the kernel's metrics (processes, tool waits, cost by user) from its DB."""
        if self.kernel is None:
            self.kernel = KernelCollector(db)
            self.registry.register(self.kernel)

    def count(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def render_async(self, engine: Any) -> bytes:
        """`render`, with each pin's block count fetched from the engine thread first."""
        try:
            fut = engine.call(_pins)
            self._engine.pins = await asyncio.wait_for(asyncio.wrap_future(fut), PIN_TIMEOUT)
        except (TimeoutError, RuntimeError, AttributeError):
            pass  # the last counts stand: a busy or stopped engine does not stall a scrape
        return self.render()


class _GenAI:
    """The OpenTelemetry GenAI metrics, as OTel's Prometheus exporter names them."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "gen_ai.server.time_to_first_token: time to generate the first token.",
            _GENAI_LABELS,
            buckets=_GENAI_TTFT,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "gen_ai.server.time_per_output_token: decode time per token after the first.",
            _GENAI_LABELS,
            buckets=_GENAI_TPOT,
            registry=r,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "gen_ai.server.request.duration: generative AI server request duration.",
            [*_GENAI_LABELS, "error_type"],
            buckets=_GENAI_DURATION,
            registry=r,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "gen_ai.client.token.usage: input and output tokens used, by request.",
            [*_GENAI_LABELS, "gen_ai_token_type"],
            buckets=_GENAI_TOKENS,
            registry=r,
        )


class _VLLM:
    """vLLM's request metrics (its engine gauges come from `_EngineCollector`)."""

    def __init__(self, r: CollectorRegistry) -> None:
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"vllm:{name}", doc, ["model_name"], buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Inter-token latency.", _ITL_BUCKETS)
        self.tpot = hist(
            "time_per_output_token_seconds", "Time per output token (old name).", _ITL_BUCKETS
        )
        self.request_tpot = hist(
            "request_time_per_output_token_seconds", "Per-request mean decode time.", _ITL_BUCKETS
        )
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.", _E2E_BUCKETS)
        self.prompt_hist = hist(
            "request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS
        )
        self.gen_hist = hist(
            "request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", ["model_name"], registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", ["model_name"], registry=r
        )
        self.success = Counter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )


class RequestTracker:
    """Latencies and token counts of one engine request, observed as its outputs arrive."""

    __slots__ = (
        "_metrics",
        "_arrival",
        "_first",
        "_last",
        "_prompt",
        "_cached",
        "_generated",
        "_out",
        "_span",
    )

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._arrival = time.monotonic()
        self._first: float | None = None
        self._last: float | None = None
        self._prompt = 0
        self._cached = 0
        self._generated = 0
        self._out: RequestOutput | None = None
        self._span = tracing.current()  # the HTTP request's span, when tracing is on

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        generated = sum(len(o.token_ids) for o in out.outputs)
        if generated > self._generated:
            m = self._metrics
            if self._last is None:
                self._first = now
                m.ttft.observe(now - self._arrival)
                m.vllm.ttft.labels(m.model).observe(now - self._arrival)
            else:
                m.itl.observe(now - self._last)
                m.vllm.itl.labels(m.model).observe(now - self._last)
                m.vllm.tpot.labels(m.model).observe(now - self._last)
            self._last = now
        self._prompt = len(out.prompt_token_ids)
        self._cached = out.num_cached_tokens
        self._generated = generated
        self._out = out

    def close(self) -> None:
        """Count the tokens once, whether the request finished, failed or was dropped."""
        m = self._metrics
        m.prompt_tokens.inc(self._prompt)
        m.generation_tokens.inc(self._generated)
        if self._out is not None:
            self._close_genai_vllm(self._out, time.monotonic())
        self._prompt = self._generated = 0
        self._out = None

    def _close_genai_vllm(self, out: RequestOutput, now: float) -> None:
        m, model = self._metrics, self._metrics.model
        span = self._span
        operation = span.operation if span is not None else "chat"
        labels = (operation, PROVIDER, model)
        reasons = [o.finish_reason for o in out.outputs if o.finish_reason]
        finished = out.finished and bool(reasons)
        first = None if self._first is None else self._first - self._arrival
        m.vllm.prompt_tokens.labels(model).inc(self._prompt)
        m.vllm.generation_tokens.labels(model).inc(self._generated)
        m.genai.tokens.labels(*labels, "input").observe(self._prompt)
        m.genai.tokens.labels(*labels, "output").observe(self._generated)
        m.genai.duration.labels(*labels, "" if finished else "cancelled").observe(
            now - self._arrival
        )
        if first is not None:
            m.genai.ttft.labels(*labels).observe(first)
        if self._first is not None and self._last is not None and self._generated > 1:
            per_token = (self._last - self._first) / (self._generated - 1)
            m.genai.tpot.labels(*labels).observe(per_token)
            m.vllm.request_tpot.labels(model).observe(per_token)
        if finished:
            m.vllm.e2e.labels(model).observe(now - self._arrival)
            m.vllm.prompt_hist.labels(model).observe(self._prompt)
            m.vllm.gen_hist.labels(model).observe(self._generated)
            for reason in reasons:
                m.vllm.success.labels(model, reason).inc()
        if span is not None:
            span.add(out.request_id, self._prompt, self._cached, self._generated, reasons, first)
