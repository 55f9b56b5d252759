"""Sub-agents (fork and join) on a scripted fake model and the real SQLite store: map_agents and
spawn_agent/wait_agents, what a child inherits, one budget for the tree, killing a parent, the
refusals, `llmos ps`'s tree, and a crash mid-fork (SIGKILL) that resumes with no child twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.backends.base import ChatRequest
from llmos.backends.scripted import ScriptedBackend, call
from llmos.kernel import Kernel, Program, Status
from llmos.kernel.process import ToolResultStep

CHILD = "name: child\nsystem_prompt: You summarize.\n"
PARENT_SYSTEM = "You fan out."


def script(parent_turns: list[dict[str, Any]], child_delay: float = 0.3) -> Any:
    """One scripted model for a tree: the parent plays `parent_turns` by its assistant count;
    a child answers `done: <its input>` after `child_delay` seconds."""

    def turn(request: ChatRequest) -> dict[str, Any]:
        system = request.messages[0]["content"]
        task = request.messages[1]["content"]
        if system.startswith(PARENT_SYSTEM):
            n = sum(m["role"] == "assistant" for m in request.messages)
            return parent_turns[min(n, len(parent_turns) - 1)]
        if task.startswith("tool "):  # a child that calls a tool first (the budget test)
            n = sum(m["role"] == "assistant" for m in request.messages)
            if n == 0:
                return {"tool_calls": [call("list_dir")], "usage": {"prompt_tokens": 80}}
        return {"content": f"done: {task}", "delay": child_delay}

    return turn


def parent(tools: list[str], **limits: Any) -> Program:
    return Program(
        name="fan", system_prompt=PARENT_SYSTEM, tools=tools, limits={"max_steps": 6, **limits}
    )


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    (d / "child.yaml").write_text(CHILD)
    return d


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(db=tmp_path / "k.db") as k:
        yield k


def results(p: Any) -> list[Any]:
    return [
        json.loads(s.output) if s.ok else s.error for s in p.steps if isinstance(s, ToolResultStep)
    ]


def test_map_agents_runs_children_in_parallel_and_answers_in_order(kernel: Kernel, ws: Path):
    inputs = [f"file {i}" for i in range(6)]
    turns = [
        {"tool_calls": [call("map_agents", program="child.yaml", inputs=inputs)]},
        {"content": "all summarized"},
    ]
    kernel.backend = ScriptedBackend(script(turns, child_delay=0.5))
    t0 = time.monotonic()
    pid = kernel.spawn(parent(["map_agents"]), "summarize", user="ann", priority=3, workspace=ws)
    p = kernel.wait(pid, 30)
    took = time.monotonic() - t0
    assert p.status is Status.DONE and p.answer == "all summarized"
    (answers,) = results(p)
    assert [a["answer"] for a in answers] == [f"done: {t}" for t in inputs]
    kids = kernel.tree(pid)
    assert [c.pid for c in kids] == [a["pid"] for a in answers]
    assert all(c.parent == pid and c.owner == "ann" and c.priority == 3 for c in kids)
    assert all(c.program.name == "child" and c.status is Status.DONE for c in kids)
    assert took < 6 * 0.5, f"6 children of 0.5 s each took {took:.2f} s: not in parallel"
    rows = kernel.store.query("SELECT user, COUNT(*) FROM usage GROUP BY user")
    assert [tuple(r) for r in rows] == [("ann", 8)]  # every child's turn is metered to ann


def test_max_parallel_children_is_a_limit(kernel: Kernel, ws: Path):
    turns = [
        {"tool_calls": [call("map_agents", program="child.yaml", inputs=["a", "b", "c", "d"])]},
        {"content": "ok"},
    ]
    kernel.backend = ScriptedBackend(script(turns, child_delay=0.3))
    t0 = time.monotonic()
    p = kernel.wait(
        kernel.spawn(parent(["map_agents"], max_parallel_children=1), "x", workspace=ws), 30
    )
    assert p.status is Status.DONE
    assert time.monotonic() - t0 >= 4 * 0.3  # one at a time
    kids = kernel.tree(p.pid)
    starts = [k.created_at for k in kids]
    assert starts == sorted(starts) and len(kids) == 4


def test_spawn_then_wait(kernel: Kernel, ws: Path):
    def turns(request: ChatRequest) -> dict[str, Any]:
        msgs = request.messages
        n = sum(m["role"] == "assistant" for m in msgs)
        if msgs[0]["content"] != PARENT_SYSTEM:
            return {"content": f"done: {msgs[1]['content']}"}
        if n < 2:
            return {
                "tool_calls": [
                    call("spawn_agent", program="self" if n else "child.yaml", input=f"job {n}")
                ]
            }
        if n == 2:
            pids = [json.loads(m["content"])["pid"] for m in msgs if m["role"] == "tool"]
            return {"tool_calls": [call("wait_agents", pids=pids)]}
        return {"content": "joined"}

    kernel.backend = ScriptedBackend(turns)
    p = kernel.wait(kernel.spawn(parent(["spawn_agent", "wait_agents"]), "go", workspace=ws), 30)
    assert p.status is Status.DONE, p.reason
    first, second, joined = results(p)
    assert [j["pid"] for j in joined] == [first["pid"], second["pid"]]
    assert joined[0] == {"pid": first["pid"], "status": "done", "answer": "done: job 0"}
    # "self": the child runs the parent's own program; it answers its own input (the script)
    assert kernel.get(second["pid"]).program.name == "fan"


def test_refusals_name_the_problem(kernel: Kernel, ws: Path):
    (ws / "evil.py").write_text("program = None\n")
    (ws / "bad.yaml").write_text("name: bad\ntools: [no_such_tool]\n")
    turns = [
        {"tool_calls": [call("wait_agents", pids=[1])]},
        {"tool_calls": [call("map_agents", program="evil.py", inputs=["a"])]},
        {"tool_calls": [call("map_agents", program="child.yaml", inputs=["a", "b", "c"])]},
        {"tool_calls": [call("spawn_agent", program="../child.yaml", input="a")]},
        {"tool_calls": [call("spawn_agent", program="bad.yaml", input="a")]},
        {"content": "gave up"},
    ]
    kernel.backend = ScriptedBackend(script(turns))
    p = kernel.wait(
        kernel.spawn(
            parent(["map_agents", "wait_agents", "spawn_agent"], max_children=2), "x", workspace=ws
        ),
        30,
    )
    errors = results(p)
    assert "not children of this process" in errors[0]
    assert "argument 'program'" in errors[1] and "evil.py" in errors[1]
    assert "limits.max_children" in errors[2] and "of 2" in errors[2]
    assert errors[3].startswith("refused:") and "program" in errors[3]
    assert "no_such_tool" in errors[4] and "argument 'program'" in errors[4]
    assert kernel.tree(p.pid) == []  # nothing was spawned


def test_children_share_the_parent_budget(kernel: Kernel, ws: Path):
    turns = [
        {"tool_calls": [call("map_agents", program="child.yaml", inputs=["tool a", "tool b"])]},
        {"content": "never reached"},
    ]
    kernel.backend = ScriptedBackend(script(turns))
    # each child alone stays under 150 (its own limit is the child program's default)...
    p = kernel.wait(
        kernel.spawn(parent(["map_agents"], max_tokens=150), "x", user="bo", workspace=ws), 30
    )
    kids = kernel.tree(p.pid)
    # ...but the tree's 2 x 90 + the parent's own tokens pass the parent's 150
    assert [k.status for k in kids] == [Status.FAILED, Status.FAILED]
    assert all("sub-agents share their parent's budget" in (k.reason or "") for k in kids)
    assert p.status is Status.FAILED and "budget" in (p.reason or "")


def test_killing_a_parent_kills_its_children(kernel: Kernel, ws: Path):
    turns = [{"tool_calls": [call("map_agents", program="child.yaml", inputs=["a", "b", "c"])]}]
    kernel.backend = ScriptedBackend(script(turns, child_delay=30))
    pid = kernel.spawn(parent(["map_agents"]), "x", workspace=ws)
    deadline = time.monotonic() + 10
    while len(kernel.tree(pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(kernel.tree(pid)) == 3
    t0 = time.monotonic()
    kernel.kill(pid)
    deadline = time.monotonic() + 10
    while not all(c.status.finished for c in kernel.tree(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kernel.get(pid).status is Status.KILLED
    assert [c.status for c in kernel.tree(pid)] == [Status.KILLED] * 3
    assert time.monotonic() - t0 < 5


CRASHY = """
import sys
sys.path.insert(0, {tests!r})
from test_children import crash_kernel
crash_kernel({db!r}, {ws!r})
"""
CRASH_INPUTS = [f"part {i}" for i in range(6)]
CRASH_TURNS = [
    {
        "tool_calls": [
            {
                "id": "fork1",
                "name": "map_agents",
                "arguments": {"program": "child.yaml", "inputs": CRASH_INPUTS},
            }
        ]
    },
    {"content": "combined"},
]


def crash_kernel(db: str, ws: str) -> None:
    """The OS process the crash test SIGKILLs mid-fork."""
    kernel = Kernel(backend=ScriptedBackend(script(CRASH_TURNS, child_delay=0.4)), db=db)
    kernel.spawn(parent(["map_agents"], max_parallel_children=2), "fork", workspace=ws)
    time.sleep(3600)


def test_crash_mid_fork_resumes_without_spawning_a_child_twice(tmp_path: Path, ws: Path):
    db = tmp_path / "crash.db"
    code = CRASHY.format(tests=str(Path(__file__).parent), db=str(db), ws=str(ws))
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        made = 0
        while time.monotonic() < deadline:  # kill it with 3 of 6 children made
            if db.exists():
                with Kernel(db=db) as k:
                    made = len(
                        k.store.query("SELECT pid FROM processes WHERE parent_pid IS NOT NULL")
                    )
            if made >= 3:
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert 3 <= made < 6, f"the kill came at {made} children, not mid-fork"
    with Kernel(backend=ScriptedBackend(script(CRASH_TURNS, child_delay=0.05)), db=db) as k:
        (root,) = [p for p in k.ps() if p.parent is None]
        assert not k.get(root.pid).status.finished
        k.resume(root.pid)
        p = k.wait(root.pid, 30)
        assert p.status is Status.DONE and p.answer == "combined"
        kids = k.tree(root.pid)
        assert sorted(c.input for c in kids) == sorted(CRASH_INPUTS)  # each exactly once
        keys = [
            r[0]
            for r in k.store.query(
                "SELECT spawn_key FROM processes WHERE parent_pid = ?", (root.pid,)
            )
        ]
        assert sorted(keys) == sorted(f"{root.pid}/fork1/{i}" for i in range(6))
        (answers,) = results(p)
        assert [a["answer"] for a in answers] == [f"done: {t}" for t in CRASH_INPUTS]
        assert all(c.status is Status.DONE for c in kids)


def test_llmos_ps_shows_the_tree(kernel: Kernel, ws: Path, tmp_path: Path):
    turns = [
        {"tool_calls": [call("map_agents", program="child.yaml", inputs=["a", "b"])]},
        {"content": "ok"},
    ]
    kernel.backend = ScriptedBackend(script(turns, child_delay=0.0))
    root = kernel.wait(kernel.spawn(parent(["map_agents"]), "x", workspace=ws), 30).pid
    other = kernel.wait(kernel.spawn(Program(name="solo"), "y", workspace=ws), 30).pid
    llmos = Path(sys.executable).parent / "llmos"
    out = subprocess.run(
        [str(llmos), "ps", "--all", "--db", str(tmp_path / "k.db")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()[1:] if line.strip()]
    firsts = [" ".join(w[:2]) if w[0] == "└─" else w[0] for w in lines]
    a, b = (c.pid for c in kernel.tree(root))
    assert firsts == [str(root), f"└─ {a}", f"└─ {b}", str(other)]


def test_llmos_kill_from_another_terminal_stops_the_tree(kernel: Kernel, ws: Path, tmp_path: Path):
    turns = [{"tool_calls": [call("map_agents", program="child.yaml", inputs=["a", "b"])]}]
    kernel.backend = ScriptedBackend(script(turns, child_delay=30))
    pid = kernel.spawn(parent(["map_agents"]), "x", workspace=ws)
    deadline = time.monotonic() + 10
    while len(kernel.tree(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    llmos = Path(sys.executable).parent / "llmos"
    out = subprocess.run(
        [str(llmos), "kill", str(pid), "--db", str(tmp_path / "k.db"), "--wait", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    p = kernel.wait(pid, 10)  # the parent saw the flag while it waited on its children
    assert p.status is Status.KILLED
    deadline = time.monotonic() + 10
    while not all(c.status.finished for c in kernel.tree(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c.status for c in kernel.tree(pid)] == [Status.KILLED, Status.KILLED]
