"""The agent loop on a scripted fake model: limits, stuck detection, the repair retry,
approvals, budgets, kills and the give-up report, with the SQLite rows they leave."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.backends.scripted import ScriptedBackend, call
from llmos.kernel import Kernel, Program, Status
from llmos.kernel.process import ErrorStep, FinalAnswer, ModelTurn, ToolCallStep, ToolResultStep

READ = call("read_file", path="notes.txt")


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


def run(kernel: Kernel, turns: Any, ws: Path, user: str | None = None, **program: Any):
    kernel.backend = ScriptedBackend(turns)
    prog = Program(**{"tools": ["read_file", "list_dir"], **program})
    pid = kernel.spawn(prog, "What is the answer in notes.txt?", user=user, workspace=ws)
    return kernel.wait(pid, 30)


def rows(kernel: Kernel, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in kernel.store.query(sql, args)]


def test_tool_call_then_answer(kernel: Kernel, ws: Path) -> None:
    p = run(kernel, [{"tool_calls": [READ]}, {"content": "It is 42."}], ws, user="ann")
    assert p.status is Status.DONE and p.answer == "It is 42." and p.report is None
    kinds = [s.kind for s in p.steps]
    assert kinds == ["model_turn", "tool_call", "tool_result", "model_turn", "final_answer"]
    result = p.steps[2]
    assert isinstance(result, ToolResultStep) and result.output == "the answer is 42"
    assert rows(kernel, "SELECT status, answer, owner FROM processes WHERE pid = ?", p.pid) == [
        ("done", "It is 42.", "ann")
    ]
    assert rows(kernel, "SELECT seq, kind FROM steps WHERE pid = ? ORDER BY seq", p.pid) == list(
        enumerate(kinds)
    )
    assert rows(kernel, "SELECT sha256 FROM steps WHERE kind = 'tool_result'") == [(result.sha256,)]
    usage = rows(kernel, "SELECT seq, user, model FROM usage WHERE pid = ?", p.pid)
    assert usage == [(0, "ann", "scripted"), (3, "ann", "scripted")]
    # the model saw the tool's real output as a tool message
    second = kernel.backend.requests[1].messages  # type: ignore[union-attr]
    assert second[-1] == {
        "role": "tool",
        "tool_call_id": p.steps[1].call_id,
        "name": "read_file",
        "content": "the answer is 42",
    }


def _report_ok(p: Any, kind: str) -> dict[str, Any]:
    r = p.report
    assert r is not None and r["kind"] == kind, r
    assert r["goal"] == "What is the answer in notes.txt?"
    assert r["stopped_because"] == p.reason and r["left_for_a_person"]
    assert r["what_failed"][-1] == p.reason
    return r


def test_step_limit(kernel: Kernel, ws: Path) -> None:
    turns = [
        {"tool_calls": [call("read_file", path="notes.txt", start_line=i)]} for i in range(1, 10)
    ]
    p = run(kernel, turns, ws, limits={"max_steps": 3})
    assert p.status is Status.FAILED and p.num_turns == 3
    r = _report_ok(p, "step_limit")
    assert len(r["steps_tried"]) == 3 and "max_steps" in r["left_for_a_person"]
    assert rows(kernel, "SELECT report IS NOT NULL, reason FROM processes") == [(1, p.reason)]


def test_stuck_detection(kernel: Kernel, ws: Path) -> None:
    p = run(kernel, [{"tool_calls": [READ]}] * 10, ws, limits={"stuck_after": 3})
    assert p.status is Status.FAILED and p.num_turns == 3
    r = _report_ok(p, "stuck")
    assert "read_file" in p.reason and len(r["steps_tried"]) == 2


def test_one_repair_retry_then_success(kernel: Kernel, ws: Path) -> None:
    turns = [{"malformed": "not valid JSON (Expecting ',' at character 12)"}, {"content": "42"}]
    p = run(kernel, turns, ws)
    assert p.status is Status.DONE and p.answer == "42"
    errors = [s for s in p.steps if isinstance(s, ErrorStep)]
    assert [e.what for e in errors] == ["malformed_output"]
    repair = kernel.backend.requests[1].messages[-1]  # type: ignore[union-attr]
    assert repair["role"] == "user" and "could not be used" in repair["content"]


def test_malformed_twice_gives_up(kernel: Kernel, ws: Path) -> None:
    p = run(kernel, [{"malformed": "bad one"}, {"malformed": "bad two"}, {"content": "x"}], ws)
    assert p.status is Status.FAILED
    r = _report_ok(p, "malformed")
    assert any("bad one" in f for f in r["what_failed"])


def test_output_schema_is_enforced_with_a_repair(kernel: Kernel, ws: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    p = run(
        kernel,
        [{"content": '{"answer": "forty-two"}'}, {"content": '{"answer": 42}'}],
        ws,
        output_schema=schema,
    )
    assert p.status is Status.DONE and p.answer == '{"answer": 42}'
    assert [s.what for s in p.steps if isinstance(s, ErrorStep)] == ["bad_answer"]
    assert "JSON schema" in kernel.backend.requests[0].messages[0]["content"]  # type: ignore


def test_tool_errors_become_observations(kernel: Kernel, ws: Path) -> None:
    turns = [
        {"tool_calls": [call("read_file", path="missing.txt")]},
        {"tool_calls": [call("read_file", path="/etc/passwd")]},
        {"tool_calls": [call("no_such_tool", x=1)]},
        {"content": "gave up nicely"},
    ]
    p = run(kernel, turns, ws)
    assert p.status is Status.DONE
    results = [s for s in p.steps if isinstance(s, ToolResultStep)]
    assert [r.ok for r in results] == [False, False, False]
    assert "does not exist" in results[0].error and "absolute" in results[1].error
    assert kernel.backend.requests[3].messages[-1]["content"].startswith("error: refused")


def test_approval_allow_and_deny(kernel: Kernel, ws: Path) -> None:
    write = {
        "tool_calls": [
            {"id": "w1", "name": "write_file", "arguments": {"path": "out.txt", "content": "hi"}}
        ]
    }
    for allow in (True, False):
        kernel.backend = ScriptedBackend([write, {"content": "finished"}])
        prog = Program(tools=["write_file"], policy={"needs_approval": ["write_file"]})
        pid = kernel.spawn(prog, "write it", workspace=ws)
        deadline = time.monotonic() + 10
        while kernel.get(pid).status is not Status.WAITING_APPROVAL:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert rows(kernel, "SELECT status FROM processes WHERE pid = ?", pid) == [
            ("waiting_approval",)
        ]
        assert not (ws / "out.txt").exists()
        kernel.approve(pid, "w1", allow)
        p = kernel.wait(pid, 10)
        assert p.status is Status.DONE
        assert (ws / "out.txt").exists() is allow
        result = next(s for s in p.steps if isinstance(s, ToolResultStep))
        assert result.ok is allow
        assert rows(kernel, "SELECT allow FROM approvals WHERE pid = ?", pid) == [(int(allow),)]
        (ws / "out.txt").unlink(missing_ok=True)


def test_process_token_budget(kernel: Kernel, ws: Path) -> None:
    turns = [
        {"tool_calls": [call("list_dir", path=".")], "usage": {"prompt_tokens": 400}},
        {"content": "never"},
    ]
    p = run(kernel, turns, ws, limits={"max_tokens": 300})
    assert p.status is Status.FAILED and "token budget" in p.reason
    _report_ok(p, "budget")


def test_user_budget_stops_the_next_process(kernel: Kernel, ws: Path) -> None:
    kernel.set_budget("bob", max_tokens=500)
    first = run(kernel, [{"content": "ok", "usage": {"prompt_tokens": 600}}], ws, user="bob")
    assert first.status is Status.DONE
    second = run(kernel, [{"content": "never"}], ws, user="bob")
    assert second.status is Status.FAILED and second.reason.startswith("user budget: bob")
    assert second.num_turns == 0
    other = run(kernel, [{"content": "fine"}], ws, user="carol")
    assert other.status is Status.DONE
    summary = {r["user"]: r for r in kernel.usage()}
    assert summary["bob"]["prompt_tokens"] == 600 and summary["bob"]["calls"] == 1


def test_cost_budget(kernel: Kernel, ws: Path) -> None:
    turns = [{"tool_calls": [READ], "engine_seconds": 36.0}, {"content": "x"}]
    p = run(kernel, turns, ws, limits={"max_cost": 0.0005})  # 36 s at $0.10/h = $0.001
    assert p.status is Status.FAILED and "cost budget" in p.reason
    assert p.usage.cost == pytest.approx(0.001)


def test_time_limit(kernel: Kernel, ws: Path) -> None:
    p = run(kernel, [{"content": "slow", "delay": 5}], ws, limits={"max_seconds": 0.3})
    assert p.status is Status.FAILED
    _report_ok(p, "time_limit")


def test_kill_a_running_process(kernel: Kernel, ws: Path) -> None:
    kernel.backend = ScriptedBackend([{"content": "slow", "delay": 30}])
    pid = kernel.spawn(Program(), "sleepy", workspace=ws)
    time.sleep(0.1)
    kernel.kill(pid)
    p = kernel.wait(pid, 5)
    assert p.status is Status.KILLED and p.report["kind"] == "killed"
    assert rows(kernel, "SELECT status FROM processes WHERE pid = ?", pid) == [("killed",)]


def test_backend_failure_is_reported(kernel: Kernel, ws: Path) -> None:
    p = run(kernel, [{"raise": "connection refused"}], ws)
    assert p.status is Status.FAILED and "connection refused" in p.reason
    _report_ok(p, "backend")


def test_many_processes_share_one_loop(kernel: Kernel, ws: Path) -> None:
    kernel.backend = ScriptedBackend(
        [{"tool_calls": [READ], "delay": 0.3}, {"content": "42", "delay": 0.3}]
    )
    t0 = time.monotonic()
    pids = [
        kernel.spawn(
            Program(tools=["read_file"]), f"job {i}", user=f"u{i % 3}", priority=i % 2, workspace=ws
        )
        for i in range(12)
    ]
    procs = [kernel.wait(pid, 30) for pid in pids]
    assert all(p.status is Status.DONE for p in procs)
    assert time.monotonic() - t0 < 12 * 0.6 / 3  # concurrent, not one after another
    assert {r.priority for r in kernel.backend.requests} == {0, 1}  # type: ignore[union-attr]
    assert len(kernel.ps()) == 12


def test_final_answer_step_is_last(kernel: Kernel, ws: Path) -> None:
    p = run(kernel, [{"content": "  done  "}], ws)
    assert isinstance(p.steps[-1], FinalAnswer) and p.answer == "done"
    assert isinstance(p.steps[0], ModelTurn) and not any(
        isinstance(s, ToolCallStep) for s in p.steps
    )


def test_closing_the_kernel_leaves_processes_resumable(tmp_path: Path, ws: Path) -> None:
    turns = [{"tool_calls": [READ]}, {"content": "slow", "delay": 30}]
    with Kernel(backend=ScriptedBackend(turns), db=tmp_path / "k.db") as k:
        pid = k.spawn(Program(tools=["read_file"]), "x", workspace=ws)
        deadline = time.monotonic() + 10
        while k.get(pid).num_turns < 1 or k.get(pid).status is not Status.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
    turns[1] = {"content": "resumed"}
    with Kernel(backend=ScriptedBackend(turns), db=tmp_path / "k.db") as k:
        assert k.get(pid).status is Status.RUNNING and k.get(pid).report is None
        p = k.wait(k.resume(pid), 10)
        assert p.status is Status.DONE and p.answer == "resumed"
        assert [s.kind for s in p.steps] == [
            "model_turn",
            "tool_call",
            "tool_result",
            "model_turn",
            "final_answer",
        ]


def test_tool_choice_per_turn_is_checked() -> None:
    p = Program(tools=["read_file"], tool_choice=["read_file", "auto"])
    assert p.tool_choice_for(0) == {"type": "function", "function": {"name": "read_file"}}
    assert p.tool_choice_for(5) == "auto"
    with pytest.raises(ValueError, match="tool_choice"):
        Program(tools=["read_file"], tool_choice="write_file")
