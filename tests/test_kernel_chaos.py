"""Chaos on one kernel: tools that hang, raise or print 100 MB; commands that leave children
behind, write a gigabyte or open a socket; backends that fail, hang or return garbage. Each is
contained, reported to the model (a tool result) and in the transcript, and a healthy process
running alongside in the same kernel finishes as if nothing happened."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.backends.base import ChatRequest, ChatResult, ToolCall, Usage
from llmos.backends.scripted import ScriptedBackend, call
from llmos.kernel import Kernel, Program, Status, tool
from llmos.kernel.builtin_tools import network_isolation
from llmos.kernel.process import ErrorStep, Process, ToolResultStep

HEALTHY = "healthy"
HEALTHY_TURNS = [
    {"tool_calls": [call("read_file", path="notes.txt")]},
    {"tool_calls": [call("list_dir")]},
    {"content": "the answer is 42"},
]


class ChaosBackend:
    """A backend playing a script per process input; a turn may also be garbage
    (`{"garbage": value}` returns that value instead of a ChatResult) or a hang."""

    kind = "scripted"
    context_window: int | None = 4096

    def __init__(self, scripts: dict[str, list[dict[str, Any]]], name: str = "chaos") -> None:
        self.scripts = {HEALTHY: HEALTHY_TURNS, **scripts}
        self.name = name
        self.inner = ScriptedBackend(self._turn, name=name)

    def _turn(self, request: ChatRequest) -> dict[str, Any]:
        script = self.scripts[request.messages[1]["content"]]
        index = sum(1 for m in request.messages if m["role"] == "assistant")
        return script[min(index, len(script) - 1)]

    async def chat(self, request: ChatRequest) -> Any:
        turn = self._turn(request)
        if "garbage" in turn:
            return turn["garbage"]
        if turn.get("hang"):
            await asyncio.sleep(3600)
        return await self.inner.chat(request)

    def count_tokens(self, messages: list[Any], tools: list[Any]) -> int:
        return self.inner.count_tokens(messages, tools)

    def release(self, key: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    (d / "notes.txt").write_text("the answer is 42\n")
    return d


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(db=tmp_path / "k.db") as k:
        yield k


def healthy_ws(ws: Path) -> Path:
    d = ws.parent / "healthy"
    d.mkdir(exist_ok=True)
    (d / "notes.txt").write_text("the answer is 42\n")
    return d


def with_healthy(
    kernel: Kernel,
    ws: Path,
    turns: list[dict[str, Any]],
    tools: list[Any],
    *,
    policy: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    timeout: float = 60,
) -> Process:
    """Run a chaos process and a healthy one side by side; the healthy one must finish."""
    kernel.backend = ChaosBackend({"chaos": turns})
    chaos = Program(name="chaos", tools=tools, policy=policy or {}, limits=limits or {})
    pid = kernel.spawn(chaos, "chaos", workspace=ws)
    healthy = kernel.spawn(
        Program(name="ok", tools=["read_file", "list_dir"]), HEALTHY, workspace=healthy_ws(ws)
    )
    p = kernel.wait(pid, timeout)
    h = kernel.wait(healthy, timeout)
    assert h.status is Status.DONE and h.answer == "the answer is 42", h.reason
    assert [s.output for s in h.steps if isinstance(s, ToolResultStep)] == [
        "the answer is 42",
        "notes.txt",
    ]
    row = kernel.store.one("SELECT status FROM processes WHERE pid = ?", (pid,))
    assert row is not None and row[0] == p.status.value  # the store says what happened too
    return p


def results(p: Process) -> list[ToolResultStep]:
    return [s for s in p.steps if isinstance(s, ToolResultStep)]


def then_answer(*calls: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"tool_calls": [c]} for c in calls] + [{"content": "contained"}]


# -- Python tools -------------------------------------------------------------------------
RELEASE = threading.Event()


@tool(read_only=True)
def hang() -> str:
    """Never returns (until the test lets it go)."""
    RELEASE.wait(120)
    return "late"


@tool(read_only=True)
def explode(depth: int) -> str:
    """Raises."""
    raise ValueError(f"exploded at depth {depth}")


@tool(read_only=True)
def chatter() -> str:
    """Prints 100 MB, then returns 100 MB."""
    line = "x" * 1_000_000
    for _ in range(100):
        print(line)
    return "y" * 100_000_000


def test_hanging_tool_times_out_and_the_kernel_serves_on(
    kernel: Kernel, ws: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    RELEASE.clear()
    started = time.monotonic()
    try:
        p = with_healthy(
            kernel, ws, then_answer(call("hang")), [hang], policy={"tool_timeout": 0.5}
        )
    finally:
        RELEASE.set()
    assert p.status is Status.DONE and p.answer == "contained"
    (r,) = results(p)
    assert not r.ok and "hang ran past its 0.5s timeout" in (r.error or "")
    assert time.monotonic() - started < 20


def test_raising_tool_becomes_an_observation(kernel: Kernel, ws: Path) -> None:
    p = with_healthy(kernel, ws, then_answer(call("explode", depth=3)), [explode])
    assert p.status is Status.DONE
    assert [(r.ok, r.error) for r in results(p)] == [(False, "ValueError: exploded at depth 3")]
    bad = with_healthy(kernel, ws, then_answer(call("explode", depth="deep")), [explode])
    assert [r.error for r in results(bad)] == [
        "refused: explode: argument 'depth': 'deep' is not of type 'integer'"
    ]


def test_tool_printing_100_mb_is_capped_and_kept_off_the_terminal(
    kernel: Kernel, ws: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    p = with_healthy(kernel, ws, then_answer(call("chatter")), [chatter])
    (r,) = results(p)
    assert r.ok and len(r.output) < 16_000 + 200
    assert r.output.startswith("y" * 1000) and "more characters cut" in r.output
    out, err = capfd.readouterr()
    assert len(out) + len(err) < 100_000  # the prints went into the call, capped, not here
    rows = kernel.store.query("SELECT length(data) FROM steps WHERE pid = ?", (p.pid,))
    assert max(n for (n,) in rows) < 40_000  # nor into the store


# -- commands -----------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


FORKER = """
import subprocess, sys, time
child = subprocess.Popen(["sleep", "60"])
open("grandchild.pid", "w").write(str(child.pid))
print("forked", flush=True)
if sys.argv[1] == "wait":
    time.sleep(60)
"""


@pytest.mark.parametrize("parent", ["wait", "exit"])
def test_command_children_die_with_it(kernel: Kernel, ws: Path, parent: str) -> None:
    """A command past its timeout, or one that exits leaving a child behind: its whole
    process group is killed, grandchildren included."""
    (ws / "forker.py").write_text(FORKER)
    p = with_healthy(
        kernel,
        ws,
        then_answer(call("run_command", argv=["python3", "forker.py", parent])),
        ["run_command"],
        policy={"commands": ["python3"], "command_timeout": 2},
    )
    (r,) = results(p)
    if parent == "wait":
        assert not r.ok and "ran past its 2s timeout" in (r.error or "")
        assert "forked" in (r.error or "")
    else:
        assert r.ok and r.output.startswith("exit code 0") and "forked" in r.output
    grandchild = int((ws / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), f"grandchild {grandchild} outlived its command"


WRITER = """
import os
block = b"z" * (1 << 20)
with open("big.bin", "wb") as f:
    for _ in range(1024):  # 1 GB
        f.write(block)
"""


def test_command_writing_a_gigabyte_is_capped(kernel: Kernel, ws: Path) -> None:
    (ws / "writer.py").write_text(WRITER)
    cap = 4 << 20
    p = with_healthy(
        kernel,
        ws,
        then_answer(
            call("run_command", argv=["python3", "writer.py"]),
            call("run_command", argv=["fallocate", "-l", "1G", "big2.bin"]),
        ),
        ["run_command"],
        policy={
            "commands": ["python3", "fallocate"],
            "max_written_bytes": cap,
            "command_timeout": 20,
        },
    )
    r, r2 = results(p)
    assert os.path.getsize(ws / "big.bin") <= cap
    assert os.path.getsize(ws / "big2.bin") <= cap
    assert r2.ok and r2.output.startswith(
        "exit code -25 (stopped: it wrote a file past the 4194304-byte limit"
    ), r2.output
    # a program that takes SIGXFSZ dies of it (and the result says which limit); Python
    # ignores it, so its write fails with EFBIG, which it reports itself
    assert r.ok and r.output.startswith("exit code "), r.error
    assert "wrote a file past the 4194304-byte limit" in r.output or "File too large" in r.output, (
        r.output
    )


CONNECTOR = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()
    print("connected")
except OSError as exc:
    print("no network:", exc)
"""


def test_command_opening_a_socket_has_no_network(kernel: Kernel, ws: Path) -> None:
    """Commands run in a new network namespace (where the OS allows one): even the loopback
    listener of the machine is out of reach. Where it does not, the result says so."""
    (ws / "connector.py").write_text(CONNECTOR)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        p = with_healthy(
            kernel,
            ws,
            then_answer(call("run_command", argv=["python3", "connector.py", str(port)])),
            ["run_command"],
            policy={"commands": ["python3"]},
        )
        try:
            accepted = server.accept()[0]
            accepted.close()
            reached = True
        except TimeoutError:
            reached = False
    finally:
        server.close()
    (r,) = results(p)
    assert r.ok, r.error
    if network_isolation() is None:
        assert "the network is not isolated here" in r.output
    else:
        assert "no network:" in r.output and not reached


# -- backends -----------------------------------------------------------------------------
GARBAGE: list[Any] = [
    None,
    "just a string",
    ChatResult(None, [{"name": "read_file"}], Usage(), 0.0),  # type: ignore[list-item]
    ChatResult(42, [], Usage(), 0.0),  # type: ignore[arg-type]
    ChatResult(None, [ToolCall("c1", "read_file", {"path": "x"})], Usage(), 0.0),  # type: ignore[arg-type]
    ChatResult("ok", [], None, 0.0),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=[f"garbage{i}" for i in range(len(GARBAGE))])
def test_backend_returning_garbage_fails_the_process_with_a_report(
    kernel: Kernel, ws: Path, garbage: Any
) -> None:
    p = with_healthy(kernel, ws, [{"garbage": garbage}], ["read_file"])
    assert p.status is Status.FAILED and p.report is not None
    assert p.report["kind"] == "backend" and "chaos" in (p.reason or "")
    assert isinstance(p.steps[-1], ErrorStep) and p.steps[-1].what == "backend"


def test_backend_that_raises_or_hangs(kernel: Kernel, ws: Path) -> None:
    failed = with_healthy(kernel, ws, [{"raise": "connection reset"}], ["read_file"])
    assert failed.status is Status.FAILED and failed.report is not None
    assert failed.report["kind"] == "backend" and "connection reset" in (failed.reason or "")
    hung = with_healthy(kernel, ws, [{"hang": True}], ["read_file"], limits={"max_seconds": 1})
    assert hung.status is Status.FAILED and hung.report is not None
    assert hung.report["kind"] == "time_limit"
    assert "ran out during a model call" in (hung.reason or "")


def test_many_hanging_tools_do_not_starve_the_others(kernel: Kernel, ws: Path) -> None:
    """More hung tool calls than the default thread pool has workers: the healthy process's
    tools still run promptly."""
    RELEASE.clear()
    kernel.backend = ChaosBackend({"chaos": then_answer(call("hang"))})
    chaos = Program(name="chaos", tools=[hang], policy={"tool_timeout": 30})
    try:
        stuck = [kernel.spawn(chaos, "chaos", workspace=ws) for _ in range(12)]
        time.sleep(0.5)
        started = time.monotonic()
        healthy = kernel.spawn(
            Program(tools=["read_file", "list_dir"]), HEALTHY, workspace=healthy_ws(ws)
        )
        h = kernel.wait(healthy, 20)
        assert h.status is Status.DONE and time.monotonic() - started < 10
    finally:
        RELEASE.set()
    for pid in stuck:
        assert kernel.wait(pid, 30).status is Status.DONE
