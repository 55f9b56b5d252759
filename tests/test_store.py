"""The store: WAL mode, migrations applied once each and in order, steps with their usage in
one transaction, and a resumed process that neither loses nor repeats a step."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llmos.backends.base import ToolCall
from llmos.backends.scripted import ScriptedBackend
from llmos.kernel import Kernel, Program, Status, journal, store
from llmos.kernel.process import ModelTurn, Process, ToolCallStep, ToolResultStep
from llmos.kernel.program import ProgramError
from llmos.kernel.store import Store


def test_wal_and_migrations(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    s = Store(db)
    names = [fn.__name__ for fn in store.MIGRATIONS]
    assert [r[0] for r in s.query("SELECT name FROM _migrations ORDER BY rowid")] == names
    assert s.one("PRAGMA journal_mode")[0] == "wal"
    tables = {r[0] for r in s.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"processes", "steps", "usage", "approvals", "budgets"} <= tables
    assert s.migrate() == []  # applied once
    s.close()


def test_a_new_migration_applies_to_an_old_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "s.db"
    Store(db).close()

    def m999_notes(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE processes ADD COLUMN notes TEXT")

    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, m999_notes])
    s = Store(db)
    assert "notes" in {r[1] for r in s.query("PRAGMA table_info(processes)")}
    assert s.one("SELECT COUNT(*) FROM _migrations WHERE name = 'm999_notes'")[0] == 1
    s.close()


def test_a_failed_transaction_leaves_no_step(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    pid = journal.create(s, Program(), "x", str(tmp_path), None, 0, "scripted")
    proc = journal.load(s, pid)
    journal.append(s, proc, ModelTurn("hi", [], prompt_tokens=3), model="m")
    with pytest.raises(sqlite3.IntegrityError):  # the same seq twice
        proc.steps.pop()
        journal.append(s, proc, ModelTurn("again", [], prompt_tokens=5), model="m")
    assert s.one("SELECT COUNT(*) FROM steps")[0] == 1
    assert s.one("SELECT COUNT(*) FROM usage")[0] == 1
    s.close()


def test_resume_finishes_an_interrupted_process(tmp_path: Path) -> None:
    """A transcript cut off while tools ran: the read-only call is run again, the call that
    writes is reported as interrupted (it may have happened), and nothing is done twice."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("alpha\n")
    db = tmp_path / "k.db"
    s = Store(db)
    prog = Program(tools=["read_file", "write_file"])
    pid = journal.create(s, prog, "go", str(ws), "ann", 0, "scripted")
    proc: Process = journal.load(s, pid)
    calls = [
        ToolCall("c1", "read_file", '{"path": "a.txt"}'),
        ToolCall("c2", "write_file", '{"path": "b.txt", "content": "x"}'),
        ToolCall("c3", "read_file", '{"path": "a.txt", "max_lines": 1}'),
    ]
    proc.status = Status.WAITING_TOOL
    journal.append(
        s, proc, ModelTurn(None, calls, prompt_tokens=10, completion_tokens=5), model="scripted"
    )
    journal.append(s, proc, ToolCallStep("c1", "read_file", calls[0].arguments))
    journal.append(s, proc, ToolResultStep("c1", "read_file", True, "alpha", None, "h"))
    journal.append(s, proc, ToolCallStep("c2", "write_file", calls[1].arguments))
    s.close()
    backend = ScriptedBackend([{"tool_calls": []}, {"content": "alpha it is"}])
    with Kernel(backend=backend, db=db) as k:
        p = k.wait(k.resume(pid), 10)
        assert p.status is Status.DONE and p.answer == "alpha it is"
        kinds = [(st.kind, getattr(st, "call_id", None)) for st in p.steps]
        assert kinds == [
            ("model_turn", None),
            ("tool_call", "c1"),
            ("tool_result", "c1"),
            ("tool_call", "c2"),
            ("tool_result", "c2"),
            ("tool_call", "c3"),
            ("tool_result", "c3"),
            ("model_turn", None),
            ("final_answer", None),
        ]
        interrupted = p.steps[4]
        assert isinstance(interrupted, ToolResultStep) and "interrupted" in interrupted.error
        assert not (ws / "b.txt").exists()
        assert k.store.one("SELECT COUNT(*) FROM usage WHERE pid = ?", (pid,))[0] == 2
        assert k.store.one("SELECT COUNT(DISTINCT seq) = COUNT(*) FROM steps")[0] == 1
        assert k.resume(pid) == pid and k.wait(pid).num_turns == 2  # done: nothing more


def test_program_yaml(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(
        "name: reader\nversion: 3\nsystem_prompt: Read.\ntools: [read_file]\n"
        "policy: {read_only: true}\nlimits: {max_steps: 4}\n"
        "sampling: {temperature: 0, max_tokens: 64}\n"
    )
    p = Program.load(f)
    assert (p.name, p.version, p.limits.max_steps, p.policy.read_only) == ("reader", "3", 4, True)
    assert p.policy.allowed_tools == ["read_file"]
    assert Program.from_dict(p.to_dict()) == p
    f.write_text("name: x\nlimts: {max_steps: 4}\n")
    with pytest.raises(ProgramError, match="limts"):
        Program.load(f)
    f.write_text("limits: {max_steps: 0}\n")
    with pytest.raises(ProgramError, match="max_steps"):
        Program.load(f)
