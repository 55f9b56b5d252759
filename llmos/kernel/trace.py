"""OpenTelemetry spans for the kernel, after the GenAI semantic conventions.

- `invoke_agent {program}` per process run, with `gen_ai.conversation.id` = the pid;
- `chat {model}` per model call: token usage (cached prompt tokens from the prefix cache and KV
  retention, as the backend reports them), finish reasons, time to first chunk;
- `execute_tool {name}` per system call, with `gen_ai.tool.call.id`. Arguments and results are
  recorded only when content capture is opted in (`capture_content=True` or the standard
  `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`); otherwise their sha256.

Tracing is off until a tracer provider is configured (`configure`, or an OTLP endpoint in
`OTEL_EXPORTER_OTLP_ENDPOINT`): the API's no-op tracer then costs a few calls per span, and no
attribute is computed for a span that does not record.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

if TYPE_CHECKING:
    from llmos.backends.base import Backend, ChatRequest, ChatResult, ToolCall
    from llmos.kernel.process import Process
    from llmos.kernel.tools import ToolResult

T = TypeVar("T")
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
PROVIDER = "llmos"  # gen_ai.provider.name of calls the kernel makes


class _Config:
    __slots__ = ("tracer", "capture", "provider")

    def __init__(self) -> None:
        self.tracer: Tracer = trace.get_tracer("llmos")  # the global one: no-op until set
        self.capture: bool | None = None  # None: read the environment
        self.provider: Any = None


_config = _Config()


def configure(
    provider: Any | None = None,
    *,
    endpoint: str | None = None,
    capture_content: bool | None = None,
) -> Tracer:
    """Trace llmos with `provider` (an SDK `TracerProvider`), or with a new one exporting OTLP
    over HTTP to `endpoint`; neither: the global tracer (no-op unless the application set one).
    Returns the tracer llmos now uses."""
    if provider is None and endpoint:
        provider = otlp_provider(endpoint)
        atexit.register(shutdown)  # export what is still batched when the program ends
    _config.provider = provider
    _config.tracer = (provider or trace).get_tracer("llmos")
    _config.capture = capture_content
    return _config.tracer


def configure_from_env(capture_content: bool | None = None) -> bool:
    """Export OTLP when the standard endpoint variables say where; True if tracing is on."""
    if capture_content is not None:
        _config.capture = capture_content
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint or _config.provider is not None:
        return _config.provider is not None
    configure(endpoint=endpoint, capture_content=capture_content)
    return True


def otlp_provider(endpoint: str, service_name: str = "llmos") -> Any:
    """A `TracerProvider` batching spans to an OTLP/HTTP collector at `endpoint`."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # the optional extra
        raise RuntimeError(
            "otlp_endpoint: exporting traces needs the OTLP exporter: pip install 'llmos[otlp]'"
        ) from exc
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    return provider


def shutdown() -> None:
    """Flush and stop the provider `configure` made or was given (no-op otherwise)."""
    if _config.provider is not None and hasattr(_config.provider, "shutdown"):
        _config.provider.shutdown()
    _config.provider = None
    _config.tracer = trace.get_tracer("llmos")
    _config.capture = None


def flush() -> None:
    """Export what the provider `configure` made or was given still holds."""
    if _config.provider is not None and hasattr(_config.provider, "force_flush"):
        _config.provider.force_flush()


def tracer() -> Tracer:
    return _config.tracer


def capture_content() -> bool:
    if _config.capture is not None:
        return _config.capture
    return os.environ.get(CAPTURE_ENV, "").strip().lower() in ("1", "true", "yes")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _fail(span: Span, exc: BaseException) -> None:
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(exc)))


# -- invoke_agent: one process run ---------------------------------------------------------
def agent_run(
    run: Callable[[Process, Any], Coroutine[Any, Any, None]],
) -> Callable[[Process, Any], Coroutine[Any, Any, None]]:
    """Wraps `loop.run(proc, ctx)` in the process's `invoke_agent` span."""

    @functools.wraps(run)
    async def traced(proc: Process, ctx: Any) -> None:
        name = proc.program.name
        with _config.tracer.start_as_current_span(
            f"invoke_agent {name}", kind=SpanKind.INTERNAL, record_exception=False
        ) as span:
            if span.is_recording():
                backend = getattr(ctx, "backend", None)
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "invoke_agent",
                        "gen_ai.provider.name": PROVIDER,
                        "gen_ai.agent.name": name,
                        "gen_ai.agent.version": str(proc.program.version),
                        "gen_ai.conversation.id": str(proc.pid),
                        "llmos.process.pid": proc.pid,
                        "llmos.process.user": proc.owner or "",
                    }
                )
                if backend is not None:
                    span.set_attribute("gen_ai.request.model", backend.name)
            try:
                await run(proc, ctx)
            except BaseException as exc:
                if span.is_recording():
                    _fail(span, exc)
                raise
            if span.is_recording():
                _agent_end(span, proc)

    return traced


def _agent_end(span: Span, proc: Process) -> None:
    u = proc.usage
    span.set_attributes(
        {
            "llmos.process.status": proc.status.value,
            "gen_ai.usage.input_tokens": u.prompt_tokens,
            "gen_ai.usage.cache_read.input_tokens": u.cached_tokens,
            "gen_ai.usage.output_tokens": u.completion_tokens,
            "llmos.usage.cost": float(u.cost),
        }
    )
    if proc.status.value in ("failed", "killed"):
        span.set_attribute("error.type", proc.status.value)
        span.set_status(Status(StatusCode.ERROR, proc.reason or proc.status.value))


# -- chat: one model call ------------------------------------------------------------------
async def chat(
    call: Awaitable[ChatResult], request: ChatRequest, backend: Backend, proc: Process
) -> ChatResult:
    """Await a model call inside its `chat {model}` span."""
    model = backend.name
    with _config.tracer.start_as_current_span(
        f"chat {model}", kind=SpanKind.CLIENT, record_exception=False
    ) as span:
        recording = span.is_recording()
        if recording:
            _chat_start(span, request, backend, proc)
        started = time.monotonic()
        try:
            result = await call
        except BaseException as exc:
            if recording:
                _fail(span, exc)
            raise
        if recording:
            _chat_end(span, result, model, time.monotonic() - started)
        return result


def _chat_start(span: Span, request: ChatRequest, backend: Backend, proc: Process) -> None:
    s = request.sampling
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": backend.kind,
        "gen_ai.request.model": backend.name,
        "gen_ai.conversation.id": str(proc.pid),
        "gen_ai.output.type": "text",
        "llmos.request.id": request.request_id or "",
    }
    for key, attr in (
        ("temperature", "gen_ai.request.temperature"),
        ("top_p", "gen_ai.request.top_p"),
        ("top_k", "gen_ai.request.top_k"),
        ("max_tokens", "gen_ai.request.max_tokens"),
        ("seed", "gen_ai.request.seed"),
        ("presence_penalty", "gen_ai.request.presence_penalty"),
        ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ):
        if s.get(key) is not None:
            attrs[attr] = s[key]
    if s.get("stop"):
        attrs["gen_ai.request.stop_sequences"] = (
            [s["stop"]] if isinstance(s["stop"], str) else list(s["stop"])
        )
    if capture_content():
        attrs["gen_ai.input.messages"] = json.dumps(request.messages, default=str)
        if request.tools:
            attrs["gen_ai.tool.definitions"] = json.dumps(request.tools)
    span.set_attributes(attrs)


def _chat_end(span: Span, result: ChatResult, model: str, seconds: float) -> None:
    u = result.usage
    first = getattr(result, "first_chunk_seconds", None)  # the engine's, where it reports it
    span.set_attributes(
        {
            "gen_ai.response.model": result.backend or model,
            "gen_ai.usage.input_tokens": u.prompt_tokens,
            "gen_ai.usage.output_tokens": u.completion_tokens,
            "gen_ai.usage.cache_read.input_tokens": u.cached_tokens,
            "gen_ai.response.finish_reasons": [result.finish_reason or "unknown"],
            "gen_ai.response.time_to_first_chunk": float(first if first is not None else seconds),
            "llmos.engine_seconds": float(result.engine_seconds),
        }
    )
    if capture_content():
        message = {"role": "assistant", "content": result.content}
        if result.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in result.tool_calls]
        span.set_attribute("gen_ai.output.messages", json.dumps([message]))


# -- execute_tool: one system call ---------------------------------------------------------
async def tool(work: Awaitable[ToolResult], call: ToolCall, proc: Process) -> ToolResult:
    """Await a system call inside its `execute_tool {name}` span."""
    with _config.tracer.start_as_current_span(
        f"execute_tool {call.name}", kind=SpanKind.INTERNAL, record_exception=False
    ) as span:
        recording = span.is_recording()
        if recording:
            spec = proc.program.tool_table.get(call.name)
            attrs: dict[str, Any] = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": call.name,
                "gen_ai.tool.call.id": call.id,
                "gen_ai.tool.type": "function",
                "gen_ai.conversation.id": str(proc.pid),
            }
            description = getattr(spec, "description", None)
            if description:
                attrs["gen_ai.tool.description"] = str(description)
            if capture_content():
                attrs["gen_ai.tool.call.arguments"] = call.arguments
            else:
                attrs["llmos.tool.call.arguments.sha256"] = sha256(call.arguments)
            span.set_attributes(attrs)
        try:
            result = await work
        except BaseException as exc:
            if recording:
                _fail(span, exc)
            raise
        if recording:
            text = result.output if result.ok else (result.error or "")
            if capture_content():
                span.set_attribute("gen_ai.tool.call.result", text)
            else:
                span.set_attribute("llmos.tool.call.result.sha256", sha256(text))
            if not result.ok:
                span.set_attribute("error.type", "tool_error")
                span.set_status(Status(StatusCode.ERROR, result.error or "the call failed"))
        return result
