"""Server spans: one `chat {model}` or `text_completion {model}` span per generation request
(GenAI semantic conventions, kind SERVER), continuing the caller's W3C `traceparent` when it
sends one. The response carries the trace id back: `traceparent` and `x-trace-id` headers.

The engine requests behind the HTTP request add their token counts, finish reasons and time to
first token to the request's `RequestSpan` (found through a context variable, so no route
passes it along); the span gets them when the response ends. With tracing off (no provider
configured) the span does not record, nothing is added and no header is sent.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import propagate
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_trace_id
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos.kernel import trace

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
}


@dataclass(slots=True)
class RequestSpan:
    """What the engine requests of one HTTP request add up to, for its span and metrics."""

    operation: str
    span: Span
    recording: bool
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    response_ids: list[str] = field(default_factory=list)
    first_token: float | None = None  # seconds from arrival, the earliest of its requests

    def add(
        self,
        request_id: str,
        prompt: int,
        cached: int,
        generated: int,
        finish_reasons: list[str],
        first_token: float | None,
    ) -> None:
        if not self.recording:
            return
        self.input_tokens += prompt
        self.cached_tokens += cached
        self.output_tokens += generated
        self.finish_reasons += finish_reasons
        self.response_ids.append(request_id)
        if first_token is not None and (self.first_token is None or first_token < self.first_token):
            self.first_token = first_token

    def finish(self, status: int) -> None:
        span = self.span
        span.set_attribute("http.response.status_code", status)
        if self.response_ids:
            span.set_attributes(
                {
                    "gen_ai.response.id": self.response_ids[0],
                    "gen_ai.usage.input_tokens": self.input_tokens,
                    "gen_ai.usage.cache_read.input_tokens": self.cached_tokens,
                    "gen_ai.usage.output_tokens": self.output_tokens,
                    "gen_ai.response.finish_reasons": self.finish_reasons or ["unknown"],
                }
            )
        if self.first_token is not None:
            span.set_attribute("gen_ai.response.time_to_first_chunk", self.first_token)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))


_current: contextvars.ContextVar[RequestSpan | None] = contextvars.ContextVar(
    "llmos_request_span", default=None
)


def current() -> RequestSpan | None:
    """The generation request being served in this context, if any."""
    return _current.get()


def setup(endpoint: str | None = None, capture_content: bool | None = None) -> bool:
    """Turn tracing on for `llmos serve`: OTLP to `endpoint`, or to the standard
    `OTEL_EXPORTER_OTLP_ENDPOINT`; off (no-op) when neither is set. True if on."""
    if endpoint:
        trace.configure(endpoint=endpoint, capture_content=capture_content)
        return True
    return trace.configure_from_env(capture_content)


class TracingMiddleware:
    """ASGI middleware: the request span around a generation route, and its trace id header."""

    def __init__(self, app: ASGIApp, model_name: Callable[[], str], port: int | None = None):
        self.app = app
        self.model_name = model_name
        self.port = port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = OPERATIONS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if operation is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        model = self.model_name()
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = propagate.extract(carrier)
        with trace.tracer().start_as_current_span(
            f"{operation} {model}", context=parent, kind=SpanKind.SERVER, record_exception=False
        ) as span:
            recording = span.is_recording()
            request = RequestSpan(operation, span, recording)
            if recording:
                self._start(span, scope, operation, model)
            token = _current.set(request)
            status = 500

            async def send_traced(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    ctx = span.get_span_context()
                    if ctx.is_valid:
                        headers = list(message.get("headers", []))
                        carrier_out: dict[str, str] = {}
                        propagate.inject(carrier_out)
                        headers += [
                            (k.encode("latin-1"), v.encode("latin-1"))
                            for k, v in carrier_out.items()
                        ]
                        headers.append((b"x-trace-id", format_trace_id(ctx.trace_id).encode()))
                        message = {**message, "headers": headers}
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                _current.reset(token)
                if recording:
                    request.finish(status)

    def _start(self, span: Span, scope: Scope, operation: str, model: str) -> None:
        server = scope.get("server") or ("", None)
        span.set_attributes(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": trace.PROVIDER,
                "gen_ai.request.model": model,
                "gen_ai.response.model": model,
                "http.request.method": "POST",
                "url.path": scope.get("path", ""),
                "server.address": str(server[0] or ""),
            }
        )
        if server[1] is not None:
            span.set_attribute("server.port", int(server[1]))


def install(app: Any, state: Any, kernel_db: str | Path | None = None) -> None:
    """Request spans (outermost middleware, so refusals get one too), the metrics' model name,
    and the kernel's metrics when the server hosts a kernel."""
    state.metrics.model = state.model_name
    if kernel_db is not None and str(kernel_db) != ":memory:":
        state.metrics.watch_kernel(str(kernel_db))
    app.add_middleware(TracingMiddleware, model_name=lambda: state.model_name)
