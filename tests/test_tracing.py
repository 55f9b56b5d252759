"""OpenTelemetry spans, captured with the SDK's in-memory exporter: the kernel's `invoke_agent`,
`chat` and `execute_tool` spans on the real model, content capture on and off, and the server's
request spans (with the trace id header) through the official `openai` client."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from llmos import LLM
from llmos.backends.local import LocalBackend
from llmos.backends.scripted import ScriptedBackend, call
from llmos.engine.async_engine import AsyncEngine
from llmos.kernel import Kernel, Program, Status, trace
from llmos.kernel.process import ModelTurn, ToolCallStep, ToolResultStep
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread

READER = Program(
    name="reader",
    system_prompt="You answer questions about files. Use read_file to read a file.",
    tools=["read_file"],
    tool_choice=["required", "auto"],
    limits={"max_steps": 4},
    sampling={"temperature": 0, "max_tokens": 48},
)
TASK = "Read the file code.txt and tell me the secret code."
CHAT_REQUIRED = {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.configure(provider, capture_content=False)
    yield exporter
    trace.shutdown()


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "code.txt").write_text("The secret code is 7319.\n")
    return tmp_path / "ws"


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def ended(exporter: InMemorySpanExporter, prefix: str, timeout: float = 10.0) -> ReadableSpan:
    """The one span named `prefix`...: a server span ends just after the response's last byte."""
    deadline = time.monotonic() + timeout
    while not (found := named(exporter, prefix)) and time.monotonic() < deadline:
        time.sleep(0.02)
    (span,) = found
    return span


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_kernel_spans_on_the_real_model(
    llm: LLM, ws: Path, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    backend = LocalBackend(llm.engine)
    with Kernel(backend=backend, db=tmp_path / "k.db") as kernel:
        p = kernel.wait(kernel.spawn(READER, TASK, user="ann", workspace=ws), 300)
    assert p.status is Status.DONE, p.report
    (agent,) = named(spans, "invoke_agent ")
    assert agent.name == "invoke_agent reader" and agent.kind is SpanKind.INTERNAL
    a = agent.attributes
    assert a["gen_ai.operation.name"] == "invoke_agent"
    assert a["gen_ai.conversation.id"] == str(p.pid)
    assert a["gen_ai.agent.name"] == "reader" and a["gen_ai.provider.name"] == "llmos"
    assert a["gen_ai.usage.input_tokens"] == p.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == p.usage.completion_tokens
    assert a["llmos.process.status"] == "done"

    turns = [s for s in p.steps if isinstance(s, ModelTurn)]
    chats = sorted(named(spans, "chat "), key=lambda s: s.start_time)
    assert len(chats) == len(turns) >= 2
    for span, turn in zip(chats, turns, strict=True):
        assert span.name == f"chat {backend.name}" and span.kind is SpanKind.CLIENT
        c = span.attributes
        assert CHAT_REQUIRED <= set(c)
        assert c["gen_ai.operation.name"] == "chat" and c["gen_ai.provider.name"] == "local"
        assert c["gen_ai.conversation.id"] == str(p.pid)
        assert span.parent is not None and span.parent.span_id == agent.context.span_id
        assert c["gen_ai.usage.input_tokens"] == turn.prompt_tokens
        assert c["gen_ai.usage.output_tokens"] == turn.completion_tokens
        assert c["gen_ai.usage.cache_read.input_tokens"] == turn.cached_tokens
        assert list(c["gen_ai.response.finish_reasons"]) == [turn.finish_reason]
        ttfc = c["gen_ai.response.time_to_first_chunk"]
        assert 0 < ttfc <= (span.end_time - span.start_time) / 1e9
        assert c["gen_ai.request.temperature"] == 0 and c["gen_ai.request.max_tokens"] == 48
        assert "gen_ai.input.messages" not in c  # content capture is off
    # the first turn's KV blocks, retained while the tool ran, served the second turn
    assert chats[1].attributes["gen_ai.usage.cache_read.input_tokens"] > 0

    call_step = next(s for s in p.steps if isinstance(s, ToolCallStep))
    result = next(s for s in p.steps if isinstance(s, ToolResultStep))
    (tool,) = named(spans, "execute_tool ")
    t = tool.attributes
    assert tool.name == "execute_tool read_file" and tool.kind is SpanKind.INTERNAL
    assert t["gen_ai.operation.name"] == "execute_tool" and t["gen_ai.tool.name"] == "read_file"
    assert t["gen_ai.tool.call.id"] == call_step.call_id and t["gen_ai.tool.type"] == "function"
    assert t["llmos.tool.call.arguments.sha256"] == sha(call_step.arguments)
    assert t["llmos.tool.call.result.sha256"] == sha(result.output)
    assert "gen_ai.tool.call.arguments" not in t and "gen_ai.tool.call.result" not in t
    assert tool.parent is not None and tool.parent.span_id == agent.context.span_id
    assert {s.context.trace_id for s in [agent, *chats, tool]} == {agent.context.trace_id}


def test_content_capture_and_failed_tools(
    ws: Path, tmp_path: Path, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace.configure(trace._config.provider, capture_content=None)  # the environment decides
    monkeypatch.setenv(trace.CAPTURE_ENV, "true")
    turns = [
        {"tool_calls": [call("read_file", path="code.txt"), call("read_file", path="nope.txt")]},
        {"content": "The code is 7319."},
    ]
    with Kernel(backend=ScriptedBackend(turns), db=tmp_path / "k.db") as kernel:
        prog = Program(name="capture", tools=["read_file"])
        p = kernel.wait(kernel.spawn(prog, TASK, workspace=ws), 30)
    assert p.status is Status.DONE
    ok, bad = sorted(named(spans, "execute_tool "), key=lambda s: s.start_time)
    assert ok.attributes["gen_ai.tool.call.arguments"] == '{"path": "code.txt"}'
    assert ok.attributes["gen_ai.tool.call.result"].startswith("The secret code is 7319.")
    assert "llmos.tool.call.result.sha256" not in ok.attributes
    assert ok.status.status_code is StatusCode.UNSET
    assert bad.status.status_code is StatusCode.ERROR
    assert bad.attributes["error.type"] == "tool_error"
    assert "nope.txt" in bad.attributes["gen_ai.tool.call.result"]
    first = min(named(spans, "chat "), key=lambda s: s.start_time)
    assert TASK in first.attributes["gen_ai.input.messages"]
    assert "read_file" in first.attributes["gen_ai.output.messages"]


def test_a_failed_model_call_and_tracing_off(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    with Kernel(backend=ScriptedBackend([{"raise": "boom"}]), db=tmp_path / "k.db") as kernel:
        p = kernel.wait(kernel.spawn(Program(name="failing"), "hi"), 30)
    assert p.status is Status.FAILED
    (chat,) = named(spans, "chat ")
    assert chat.status.status_code is StatusCode.ERROR
    assert chat.attributes["error.type"] == "RuntimeError"
    (agent,) = named(spans, "invoke_agent ")
    assert agent.status.status_code is StatusCode.ERROR and agent.attributes["error.type"]
    trace.shutdown()  # tracing off: the no-op tracer, and nothing recorded
    spans.clear()
    with Kernel(backend=ScriptedBackend([{"content": "ok"}]), db=tmp_path / "k2.db") as kernel:
        assert kernel.wait(kernel.spawn(Program(), "hi"), 30).status is Status.DONE
    assert spans.get_finished_spans() == ()


# -- server request spans -----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[RunningServer]:
    with serve_in_thread(create_app(AsyncEngine(llm.engine))) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_server_chat_span_and_trace_id_header(
    client: OpenAI, server: RunningServer, spans: InMemorySpanExporter
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=8,
        temperature=0,
    )
    done = raw.parse()
    trace_id = raw.headers["x-trace-id"]
    assert len(trace_id) == 32 and raw.headers["traceparent"].split("-")[1] == trace_id
    span = ended(spans, "chat ")
    assert format_trace_id(span.context.trace_id) == trace_id
    assert span.kind is SpanKind.SERVER and span.name == f"chat {done.model}"
    a = span.attributes
    assert CHAT_REQUIRED <= set(a) and a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.usage.input_tokens"] == done.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == done.usage.completion_tokens
    assert list(a["gen_ai.response.finish_reasons"]) == [done.choices[0].finish_reason]
    assert a["gen_ai.response.id"] and a["http.response.status_code"] == 200
    assert a["gen_ai.response.time_to_first_chunk"] > 0
    assert a["server.port"] == int(server.url.rsplit(":", 1)[1])


def test_server_streamed_completion_continues_the_callers_trace(
    server: RunningServer, spans: InMemorySpanExporter
) -> None:
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = {
        "model": "smollm2-135m",
        "prompt": "The capital of France is",
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"traceparent": f"00-{parent_trace}-{parent_span}-01"}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers["x-trace-id"] == parent_trace
        chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]"
    span = ended(spans, "text_completion ")
    assert format_trace_id(span.context.trace_id) == parent_trace
    assert span.parent is not None and format_span_id(span.parent.span_id) == parent_span
    a = span.attributes
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.usage.output_tokens"] == 6
    assert 0 < a["gen_ai.response.time_to_first_chunk"] <= (span.end_time - span.start_time) / 1e9


def test_server_errors_are_spans_too_and_off_means_no_header(
    client: OpenAI, server: RunningServer, spans: InMemorySpanExporter
) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "smollm2-135m", "messages": [], "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 400 and r.headers["x-trace-id"]
    span = ended(spans, "chat ")
    assert span.status.status_code is StatusCode.ERROR and span.attributes["error.type"] == "400"
    trace.shutdown()
    raw = client.completions.with_raw_response.create(
        model="smollm2-135m", prompt="Hi", max_tokens=2
    )
    assert "x-trace-id" not in raw.headers and "traceparent" not in raw.headers


# -- OTLP export, end to end -----------------------------------------------------------------
class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.posts.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_llmos_run_exports_otlp_to_the_configured_endpoint(tmp_path: Path, ws: Path) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT set: `llmos run`'s spans reach the collector over OTLP/HTTP
    (protobuf), decoded here with the OTLP schema."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    sink.posts = []  # type: ignore[attr-defined]
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    turns = tmp_path / "turns.json"
    turns.write_text(
        json.dumps(
            [
                {"tool_calls": [{"name": "read_file", "arguments": {"path": "code.txt"}}]},
                {"content": "7319"},
            ]
        )
    )
    env = {
        **os.environ,
        "LLMOS_DB": str(tmp_path / "k.db"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
    }
    program = tmp_path / "reader.yaml"
    program.write_text(f"name: reader\ntools: [read_file]\nmodel: 'scripted:{turns}'\n")
    llmos = Path(sys.executable).with_name("llmos")
    r = subprocess.run(
        [str(llmos), "run", str(program), "--input", TASK, "--workspace", str(ws), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    sink.shutdown()
    assert r.returncode == 0, r.stderr
    assert "7319" in r.stdout
    assert sink.posts and {path for path, _ in sink.posts} == {"/v1/traces"}  # type: ignore[attr-defined]
    names, attrs = [], {}
    for _, body in sink.posts:  # type: ignore[attr-defined]
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert service["service.name"] == "llmos"
            for ss in rs.scope_spans:
                for span in ss.spans:
                    names.append(span.name)
                    attrs[span.name] = {a.key: a.value for a in span.attributes}
    assert sorted(names) == ["chat scripted:turns.json"] * 2 + [
        "execute_tool read_file",
        "invoke_agent reader",
    ]
    assert attrs["invoke_agent reader"]["gen_ai.conversation.id"].string_value == "1"
    assert attrs["execute_tool read_file"]["gen_ai.tool.call.id"].string_value


def test_serve_setup_exports_to_its_endpoint_and_is_off_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `llmos serve --otlp-endpoint URL` calls: spans go to URL/v1/traces; no endpoint (and
    no OTEL_EXPORTER_OTLP_ENDPOINT): off."""
    from llmos.server import tracing

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.setup(None) is False
    with trace.tracer().start_as_current_span("x") as span:
        assert not span.is_recording()
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    sink.posts = []  # type: ignore[attr-defined]
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        assert tracing.setup(f"http://127.0.0.1:{sink.server_address[1]}", True) is True
        assert trace.capture_content()
        with trace.tracer().start_as_current_span("probe") as span:
            assert span.is_recording()
        trace.flush()
    finally:
        trace.shutdown()
        sink.shutdown()
    ((path, body),) = sink.posts  # type: ignore[attr-defined]
    assert path == "/v1/traces" and b"probe" in body
