"""The backends on the real embedded model: `local` (the engine in-process) and `openai_http`
against a real `llmos serve` on a free loopback port, plus one end-to-end agent run in which
SmolLM2 reads a file with a (grammar-constrained) tool call and then answers."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos import LLM
from llmos.backends import ChatRequest
from llmos.backends.local import LocalBackend
from llmos.backends.openai_http import OpenAIHTTPBackend
from llmos.kernel import Kernel, Program, Status
from llmos.kernel.process import ModelTurn, ToolResultStep
from llmos.kernel.tools import TOOLS

READER = Program(
    name="reader",
    system_prompt="You answer questions about files. Use read_file to read a file.",
    tools=["read_file"],
    tool_choice=["required", "auto"],
    limits={"max_steps": 4},
    sampling={"temperature": 0, "max_tokens": 64},
)
TASK = "Read the file code.txt and tell me the secret code."


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "code.txt").write_text("The secret code is 7319.\n")
    return tmp_path / "ws"


def test_local_backend_chat_usage_priority_and_cache(llm: LLM) -> None:
    seen: list[tuple[int, str | None]] = []

    async def go() -> list:
        backend = LocalBackend(llm.engine)
        real = backend.engine.generate

        def spy(prompt, params, **kw):  # noqa: ANN001, ANN202
            seen.append((kw["priority"], kw["user"]))
            return real(prompt, params, **kw)

        backend.engine.generate = spy  # type: ignore[method-assign]
        msgs = [
            {"role": "system", "content": "You are terse. " * 20},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        req = ChatRequest(msgs, sampling={"max_tokens": 8}, priority=3, user="ann")
        try:
            return [
                await backend.chat(req),
                await backend.chat(req),
                backend.count_tokens(msgs, []),
            ]
        finally:
            await backend.aclose()

    first, second, counted = asyncio.run(go())
    assert first.content and first.tool_calls == [] and first.finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens == counted > 40
    assert 0 < first.usage.completion_tokens <= 8 and first.engine_seconds > 0
    assert second.usage.cached_tokens >= 32  # the same prompt: its full blocks are cached
    assert seen == [(3, "ann"), (3, "ann")]


def test_local_backend_constrained_tool_call(llm: LLM) -> None:
    streamed: list[tuple[int, str, str, float]] = []

    async def go():  # noqa: ANN202
        backend = LocalBackend(llm.engine)
        try:
            result = await backend.chat(
                ChatRequest(
                    [{"role": "user", "content": TASK}],
                    [TOOLS["read_file"].to_openai()],
                    "required",
                    {"max_tokens": 64},
                    on_tool_call=lambda i, c: streamed.append(
                        (i, c.name, c.arguments, time.monotonic())
                    ),
                )
            )
            return result, time.monotonic()
        finally:
            await backend.aclose()

    result, ended = asyncio.run(go())
    assert result.finish_reason == "tool_calls" and result.malformed is None
    (call,) = result.tool_calls
    # the call was handed over as the grammar closed it, once, with the final arguments
    assert [s[:3] for s in streamed] == [(0, call.name, call.arguments)]
    assert streamed[0][3] <= ended
    assert call.name == "read_file" and call.id.startswith("call_")
    assert "path" in __import__("json").loads(call.arguments)
    assert result.raw.startswith("<tool_call>")


def test_end_to_end_smollm2_reads_a_file_and_answers(llm: LLM, ws: Path, tmp_path: Path) -> None:
    with Kernel(backend=LocalBackend(llm.engine), db=tmp_path / "k.db") as kernel:
        p = kernel.wait(kernel.spawn(READER, TASK, user="e2e", workspace=ws), 300)
    assert p.status is Status.DONE, p.report
    assert "7319" in (p.answer or "")
    turns = [s for s in p.steps if isinstance(s, ModelTurn)]
    assert turns[0].tool_calls[0].name == "read_file"
    result = next(s for s in p.steps if isinstance(s, ToolResultStep))
    assert result.ok and "7319" in result.output
    # The first turn's blocks, pinned while read_file ran, served the second turn whole: the
    # tool prompt is the same for tool_choice "required" and "auto".
    history = turns[0].prompt_tokens + turns[0].completion_tokens
    assert turns[1].cached_tokens >= (history - 1) // 16 * 16 - 16
    assert llm.engine.stats().num_pins == 0  # released when the process ended
    assert p.usage.cost > 0 and p.usage.engine_seconds > 0


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """A real `llmos serve` on a free loopback port; yields its /v1 URL."""
    exe = str(Path(sys.executable).parent / "llmos")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [exe, "serve", "--port", "0", "--kv-cache-memory", "128MiB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"at (http://[\d.]+:\d+)/v1", line)
        url = m.group(1) + "/v1" if m else None
    if url is None:
        proc.kill()
        pytest.fail("llmos serve did not start")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_openai_http_against_llmos_serve(served: str) -> None:
    async def go():  # noqa: ANN202
        backend = OpenAIHTTPBackend(served, "smollm2-135m", send_priority=True)
        try:
            return await backend.chat(
                ChatRequest(
                    [{"role": "user", "content": "Say hello."}],
                    sampling={"max_tokens": 8, "temperature": 0},
                    user="ann",
                    priority=1,
                )
            )
        finally:
            await backend.aclose()

    result = asyncio.run(go())
    assert result.content and result.tool_calls == []
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 8
    assert result.engine_seconds > 0


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up the weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


def test_openai_http_streams_tool_calls_as_they_complete(served: str) -> None:
    """With `on_tool_call` the call is streamed: each tool call is handed over once its
    arguments are whole, and the result is the one the unstreamed call returns."""
    seen: list[tuple[int, str, str, float]] = []
    request = ChatRequest(
        [{"role": "user", "content": "What is the weather in Paris?"}],
        [LOOKUP],
        "required",
        {"max_tokens": 40, "temperature": 0},
    )

    async def go():  # noqa: ANN202
        backend = OpenAIHTTPBackend(served, "smollm2-135m")
        try:
            plain = await backend.chat(request)
            request.on_tool_call = lambda i, c: seen.append(
                (i, c.name, c.arguments, time.monotonic())
            )
            streamed = await backend.chat(request)
            return plain, streamed, time.monotonic()
        finally:
            await backend.aclose()

    plain, streamed, ended = asyncio.run(go())
    calls = [(i, c.name, c.arguments) for i, c in enumerate(streamed.tool_calls)]
    assert calls and [s[:3] for s in seen] == calls
    assert [(c.name, c.arguments) for c in plain.tool_calls] == [c[1:] for c in calls]
    assert streamed.usage.prompt_tokens == plain.usage.prompt_tokens > 0
    assert streamed.usage.completion_tokens == plain.usage.completion_tokens > 0
    assert streamed.finish_reason == plain.finish_reason == "tool_calls"
    assert all(t <= ended for *_, t in seen)


def test_kernel_over_openai_http(served: str, ws: Path, tmp_path: Path) -> None:
    """The same program through the HTTP backend, with the server's native (grammar-
    constrained) tool calls: it reads the file and answers, metered under the HTTP model."""
    backend = OpenAIHTTPBackend(served, "smollm2-135m", native_tools=True)
    with Kernel(backend=backend, db=tmp_path / "k.db") as kernel:
        p = kernel.wait(kernel.spawn(READER, TASK, user="http", workspace=ws), 300)
        rows = kernel.store.query("SELECT model, prompt_tokens, completion_tokens FROM usage")
    assert rows and all(r["model"].startswith("openai_http:smollm2-135m@") for r in rows)
    assert all(r["prompt_tokens"] > 0 for r in rows)
    assert p.status is Status.DONE, p.report
    assert "7319" in (p.answer or "")
    turns = [s for s in p.steps if isinstance(s, ModelTurn)]
    assert turns[0].tool_calls and turns[0].tool_calls[0].name == "read_file"
