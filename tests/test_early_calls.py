"""Streamed tool calls and speculation (kernel/early.py) on a scripted model that "writes" each
call for a set time: read-only calls start as soon as their arguments are complete (or, with
speculate_tools, before the model answers, from the last run on the same input), writes wait,
and the transcript is identical with the features on and off (wrong guesses leave no trace)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.backends.base import ChatRequest
from llmos.backends.scripted import ScriptedBackend
from llmos.kernel import Kernel, Program, Status, tool
from llmos.kernel.process import step_to_json

RAN: list[tuple[str, str, float]] = []  # (tool, argument, time.time() it started)
LOCK = threading.Lock()
TOOL_SECONDS = 0.4


@tool(read_only=True)
def slow_read(key: str) -> str:
    """Look a key up (slowly, like a network read).

    Args:
        key: The key.
    """
    with LOCK:
        RAN.append(("slow_read", key, time.time()))
    time.sleep(TOOL_SECONDS)
    return f"value of {key}"


def c(i: str, name: str, **args: Any) -> dict[str, Any]:
    return {"id": i, "name": name, "arguments": args}


def script(calls: list[dict[str, Any]], delays: list[float]) -> Any:
    def turn(request: ChatRequest) -> dict[str, Any]:
        if not any(m["role"] == "assistant" for m in request.messages):
            return {"tool_calls": calls, "call_delays": delays}
        return {"content": "done"}

    return turn


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(db=tmp_path / "k.db") as k:
        yield k


def run(kernel: Kernel, ws: Path, turns: Any, **program: Any) -> tuple[Any, float]:
    kernel.backend = ScriptedBackend(turns)
    prog = Program(name="reader", tools=[slow_read, "read_file", "write_file"], **program)
    t0 = time.monotonic()
    p = kernel.wait(kernel.spawn(prog, "look up a, b and c", workspace=ws), 30)
    assert p.status is Status.DONE, p.reason
    return p, time.monotonic() - t0


def transcript(p: Any) -> list[str]:
    return [step_to_json(s) for s in p.steps]


def turn_time(kernel: Kernel, pid: int) -> float:
    row = kernel.store.one(
        "SELECT created_at FROM steps WHERE pid = ? AND kind = 'model_turn' ORDER BY seq", (pid,)
    )
    assert row is not None
    return row[0]


READS = [
    c("k1", "slow_read", key="a"),
    c("k2", "slow_read", key="b"),
    c("k3", "slow_read", key="c"),
]
DELAYS = [0.3, 0.3, 0.3, 0.1]  # each call takes 0.3 s to write, then 0.1 s to end the turn


def test_streamed_reads_start_while_the_model_writes_and_change_nothing(
    kernel: Kernel, tmp_path: Path
) -> None:
    RAN.clear()
    off, t_off = run(kernel, tmp_path, script(READS, DELAYS), stream_tools=False)
    off_starts = [t for *_, t in RAN]
    RAN.clear()
    on, t_on = run(kernel, tmp_path, script(READS, DELAYS), stream_tools=True)
    on_starts = [t for *_, t in RAN]
    assert transcript(on) == transcript(off)
    # off: every read starts after the turn is journaled; on: the first two before it
    assert all(t >= turn_time(kernel, off.pid) for t in off_starts)
    ended = turn_time(kernel, on.pid)
    assert sum(t < ended for t in on_starts) >= 2, (on_starts, ended)
    assert len(on_starts) == 3  # each read ran once: the early result stood in for the call
    assert t_on < t_off - 2 * TOOL_SECONDS * 0.6, (t_on, t_off)


def test_a_read_after_a_write_of_the_same_turn_waits(kernel: Kernel, tmp_path: Path) -> None:
    calls = [
        c("w1", "write_file", path="new.txt", content="fresh"),
        c("r1", "read_file", path="new.txt"),
    ]
    off, _ = run(kernel, tmp_path / "off", script(calls, [0.2, 0.2, 0.1]), stream_tools=False)
    on, _ = run(kernel, tmp_path / "on", script(calls, [0.2, 0.2, 0.1]), stream_tools=True)
    assert transcript(on) == transcript(off)
    result = [s for s in on.steps if s.kind == "tool_result"][-1]
    assert result.ok and result.output == "fresh"  # read after the write, not before it


@pytest.fixture(autouse=True)
def _folders(tmp_path: Path) -> None:
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()


def test_speculation_prerun_from_the_last_run_and_wrong_guesses_leave_no_trace(
    kernel: Kernel, tmp_path: Path
) -> None:
    # a first run teaches the prediction; the second is the same: all 3 reads ran early
    first, _ = run(kernel, tmp_path, script(READS, DELAYS), speculate_tools=True)
    RAN.clear()
    again, took = run(kernel, tmp_path, script(READS, DELAYS), speculate_tools=True)
    ended = turn_time(kernel, again.pid)
    assert len(RAN) == 3 and all(t < ended for *_, t in RAN)
    assert transcript(again) == transcript(first)
    # a different turn this time: the guesses (a, b, c) are dropped, and d, e are run
    RAN.clear()
    other = [c("k1", "slow_read", key="d"), c("k2", "slow_read", key="e")]
    spec, _ = run(kernel, tmp_path, script(other, [0.2, 0.2, 0.1]), speculate_tools=True)
    plain, _ = run(kernel, tmp_path, script(other, [0.2, 0.2, 0.1]), stream_tools=False)
    assert transcript(spec) == transcript(plain)
    assert spec.usage.total_tokens == plain.usage.total_tokens
    guessed = {k for name, k, _ in RAN}
    assert {"a", "b", "c"} <= guessed  # they ran (speculation) but left no step
    assert "value of a" not in " ".join(transcript(spec))
