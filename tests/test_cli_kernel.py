"""The kernel commands, run as real `llmos` subprocesses, asserting on the SQLite rows they
leave. The crash test SIGKILLs `llmos run` mid-tool and `llmos resume` finishes the process
with no step lost or repeated and its usage counted once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

LLMOS = [str(Path(sys.executable).parent / "llmos")]
PROGRAM = '''
import os, time
from llmos.kernel import Program, tool

@tool(read_only=True)
def slow_lookup(key: str) -> str:
    """Look a key up, slowly."""
    time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
    return f"value of {{key}}"

program = Program(name="crashy", version="2", model="scripted:{turns}",
                  tools=["slow_lookup", "write_file"],
                  policy={{"needs_approval": ["write_file"]}})
'''
TURNS = [
    {"tool_calls": [{"id": "k1", "name": "slow_lookup", "arguments": {"key": "a"}}]},
    {"tool_calls": [{"id": "k2", "name": "slow_lookup", "arguments": {"key": "b"}}]},
    {"content": "a and b are known"},
]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "LLMOS_BACKEND"}
    e.update(LLMOS_DB=str(tmp_path / "k.db"), OMP_NUM_THREADS="1", COLUMNS="200")
    return e


def llmos(
    *args: str, env: dict[str, str], cwd: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [*LLMOS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def db_rows(env: dict[str, str], sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(env["LLMOS_DB"]) as db:
        return [tuple(r) for r in db.execute(sql, args)]


def write_program(tmp_path: Path, turns: list[dict[str, Any]]) -> Path:
    (tmp_path / "turns.json").write_text(json.dumps(turns))
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM.format(turns=tmp_path / "turns.json"))
    return prog


def test_run_ps_logs_usage(tmp_path: Path, env: dict[str, str]) -> None:
    prog = write_program(tmp_path, TURNS)
    r = llmos(
        "run", str(prog), "--input", "look up a and b", "--user", "ann", env=env, cwd=tmp_path
    )
    assert r.stdout.strip() == "a and b are known"
    assert db_rows(
        env, "SELECT pid, status, program_name, program_version, owner, input FROM processes"
    ) == [(1, "done", "crashy", "2", "ann", "look up a and b")]
    assert db_rows(env, "SELECT kind FROM steps ORDER BY seq") == [
        ("model_turn",),
        ("tool_call",),
        ("tool_result",),
        ("model_turn",),
        ("tool_call",),
        ("tool_result",),
        ("model_turn",),
        ("final_answer",),
    ]
    assert db_rows(env, "SELECT COUNT(*), MIN(user) FROM usage") == [(3, "ann")]
    assert "crashy@2" in llmos("ps", "--all", env=env, cwd=tmp_path).stdout
    assert "crashy" not in llmos("ps", env=env, cwd=tmp_path).stdout  # finished: hidden
    logs = llmos("logs", "1", env=env, cwd=tmp_path).stdout
    assert "value of a" in logs and "a and b are known" in logs
    usage = llmos("usage", "--user", "ann", env=env, cwd=tmp_path).stdout
    assert "ann" in usage and "scripted:turns.json" in usage


def test_default_program_and_give_up_report(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "turns.json").write_text(
        json.dumps([{"tool_calls": [{"name": "list_dir", "arguments": {}}]}] * 5)
    )
    r = llmos(
        "run",
        "what is here?",
        "--model",
        f"scripted:{tmp_path / 'turns.json'}",
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 1
    assert "Give-up report (stuck)" in r.stderr and "left for a person" in r.stderr
    ((status, reason, report),) = db_rows(env, "SELECT status, reason, report FROM processes")
    assert status == "failed" and reason.startswith("stuck")
    assert json.loads(report)["goal"] == "what is here?"
    program = json.loads(db_rows(env, "SELECT program FROM processes")[0][0])
    assert program["policy"]["read_only"] and "read_file" in program["tools"]
    assert "Give-up report" in llmos("logs", "1", env=env, cwd=tmp_path).stderr


def test_usage_budget_stops_a_run(tmp_path: Path, env: dict[str, str]) -> None:
    llmos("usage", "--user", "bob", "--max-tokens", "1", env=env, cwd=tmp_path)
    assert db_rows(env, "SELECT user, max_tokens FROM budgets") == [("bob", 1)]
    prog = write_program(tmp_path, TURNS)
    for _ in range(2):  # the first spends its one call; the second may not start at all
        r = llmos("run", str(prog), "--user", "bob", env=env, cwd=tmp_path, check=False)
        assert r.returncode == 1 and "user budget: bob" in r.stderr
    assert db_rows(env, "SELECT status FROM processes ORDER BY pid") == [("failed",)] * 2
    assert db_rows(env, "SELECT pid, COUNT(*) FROM usage GROUP BY pid") == [(1, 1)]


def test_approve_from_another_terminal(tmp_path: Path, env: dict[str, str]) -> None:
    turns = [
        {
            "tool_calls": [
                {
                    "id": "w1",
                    "name": "write_file",
                    "arguments": {"path": "out.txt", "content": "hi"},
                }
            ]
        },
        {"content": "written"},
    ]
    prog = write_program(tmp_path, turns)
    runner = subprocess.Popen(
        [*LLMOS, "run", str(prog)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(env, "SELECT 1 FROM processes WHERE status = 'waiting_approval'")
        assert not (tmp_path / "out.txt").exists()
        r = llmos("approve", "1", env=env, cwd=tmp_path)
        assert "approved w1" in r.stdout
        stdout, _ = runner.communicate(timeout=30)
    finally:
        runner.kill()
    assert runner.returncode == 0 and stdout.strip() == "written"
    assert (tmp_path / "out.txt").read_text() == "hi"
    assert db_rows(env, "SELECT call_id, allow FROM approvals") == [("w1", 1)]


def test_kill_from_another_terminal(tmp_path: Path, env: dict[str, str]) -> None:
    prog = write_program(tmp_path, TURNS)
    env = {**env, "SLOW_SECONDS": "1"}
    runner = subprocess.Popen(
        [*LLMOS, "run", str(prog)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(env, "SELECT 1 FROM steps WHERE kind = 'tool_call'")
        assert "killed" in llmos("kill", "1", env=env, cwd=tmp_path).stdout
        runner.communicate(timeout=30)
    finally:
        runner.kill()
    assert runner.returncode == 1
    assert db_rows(env, "SELECT status FROM processes") == [("killed",)]


def _wait_for(env: dict[str, str], sql: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(env["LLMOS_DB"]).exists():
            try:
                if db_rows(env, sql):
                    return
            except sqlite3.OperationalError:
                pass  # the tables are still being made
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for: {sql}")


def test_sigkill_mid_run_then_resume(tmp_path: Path, env: dict[str, str]) -> None:
    prog = write_program(tmp_path, TURNS)
    slow = {**env, "SLOW_SECONDS": "3"}
    runner = subprocess.Popen(
        [*LLMOS, "run", str(prog), "--input", "go"],
        env=slow,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:  # kill it while the second (slow) tool call runs
        _wait_for(env, "SELECT 1 FROM steps WHERE kind = 'tool_call' AND seq = 4")
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
    finally:
        runner.kill()
    before = db_rows(env, "SELECT seq, kind, data FROM steps ORDER BY seq")
    assert [k for _, k, _ in before] == [
        "model_turn",
        "tool_call",
        "tool_result",
        "model_turn",
        "tool_call",
    ]
    assert db_rows(env, "SELECT status FROM processes") == [("waiting_tool",)]
    ps = llmos("ps", env=env, cwd=tmp_path).stdout
    assert "stopped: llmos resume" in ps
    usage_before = db_rows(env, "SELECT * FROM usage ORDER BY seq")
    r = llmos("resume", "1", env={**env, "SLOW_SECONDS": "0.1"}, cwd=tmp_path)
    assert r.stdout.strip() == "a and b are known"
    after = db_rows(env, "SELECT seq, kind, data FROM steps ORDER BY seq")
    assert after[:5] == before  # nothing lost or rewritten
    assert [k for _, k, _ in after] == [
        "model_turn",
        "tool_call",
        "tool_result",
        "model_turn",
        "tool_call",
        "tool_result",
        "model_turn",
        "final_answer",
    ]
    results = [json.loads(d) for _, k, d in after if k == "tool_result"]
    assert [(x["call_id"], x["output"]) for x in results] == [
        ("k1", "value of a"),
        ("k2", "value of b"),
    ]
    usage = db_rows(env, "SELECT * FROM usage ORDER BY seq")
    assert usage[:2] == usage_before and len(usage) == 3  # counted once per model turn
    assert [row[2] for row in usage] == [0, 3, 6]
    assert db_rows(env, "SELECT status, answer FROM processes") == [("done", "a and b are known")]
