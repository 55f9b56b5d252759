"""Processes and their transcripts in the store: create, append a step (with its usage row, in
one transaction), load, and the flags other OS processes set (kill, approvals)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from llmos.kernel.process import ModelTurn, Process, Status, Step, step_from_json, step_to_json
from llmos.kernel.program import Program
from llmos.kernel.store import Store


def create(
    store: Store,
    program: Program,
    input: str,
    workspace: str,
    owner: str | None,
    priority: int,
    backend: str | None,
) -> int:
    now = time.time()
    with store.transaction() as db:
        cur = db.execute(
            "INSERT INTO processes (program, program_name, program_version, prompt_hash, input,"
            " workspace, owner, priority, backend, status, created_at, updated_at, runner_pid)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                program.to_json(),
                program.name,
                program.version,
                program.prompt_hash,
                input,
                workspace,
                owner,
                priority,
                backend,
                Status.READY.value,
                now,
                now,
                os.getpid(),
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid


def append(store: Store, proc: Process, step: Step, *, model: str | None = None) -> None:
    """Commit one step (and, for a model turn, its usage row) before anything else happens."""
    seq = len(proc.steps)
    now = time.time()
    sha = getattr(step, "sha256", None)
    with store.transaction() as db:
        db.execute(
            "INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?)",
            (proc.pid, seq, step.kind, step_to_json(step), sha, now),
        )
        if isinstance(step, ModelTurn):
            db.execute(
                "INSERT INTO usage (pid, seq, user, model, prompt_tokens, cached_tokens,"
                " completion_tokens, engine_seconds, cost, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    proc.pid,
                    seq,
                    proc.owner,
                    model or "unknown",
                    step.prompt_tokens,
                    step.cached_tokens,
                    step.completion_tokens,
                    step.engine_seconds,
                    step.cost,
                    now,
                ),
            )
        db.execute(
            "UPDATE processes SET status = ?, elapsed = ?, updated_at = ? WHERE pid = ?",
            (proc.status.value, proc.elapsed, now, proc.pid),
        )
    proc.steps.append(step)


def save_status(store: Store, proc: Process) -> None:
    report = json.dumps(proc.report) if proc.report is not None else None
    with store.transaction() as db:
        db.execute(
            "UPDATE processes SET status = ?, answer = ?, reason = ?, report = ?,"
            " elapsed = ?, updated_at = ? WHERE pid = ?",
            (
                proc.status.value,
                proc.answer,
                proc.reason,
                report,
                proc.elapsed,
                time.time(),
                proc.pid,
            ),
        )


def load(store: Store, pid: int, program: Program | None = None) -> Process:
    row = store.one("SELECT * FROM processes WHERE pid = ?", (pid,))
    if row is None:
        raise KeyError(f"no process with pid {pid}")
    if program is None:  # the stored spec: loading a process runs none of its program's code
        program = Program.from_dict(json.loads(row["program"]))
    steps = [
        step_from_json(r["kind"], r["data"])
        for r in store.query("SELECT kind, data FROM steps WHERE pid = ? ORDER BY seq", (pid,))
    ]
    return Process(
        pid=pid,
        program=program,
        input=row["input"],
        workspace=row["workspace"],
        owner=row["owner"],
        priority=row["priority"],
        status=Status(row["status"]),
        steps=steps,
        answer=row["answer"],
        report=json.loads(row["report"]) if row["report"] else None,
        reason=row["reason"],
        created_at=row["created_at"],
        elapsed=row["elapsed"],
    )


def runner_alive(row: Any) -> bool:
    """Is the OS process that last ran this process still there?"""
    pid = row["runner_pid"]
    if not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is not running anything
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def claim(store: Store, pid: int) -> None:
    with store.transaction() as db:
        db.execute(
            "UPDATE processes SET runner_pid = ?, kill_requested = 0 WHERE pid = ?",
            (os.getpid(), pid),
        )


def release(store: Store, pid: int) -> None:
    """No OS process runs it any more (the kernel that ran it shut down)."""
    with store.transaction() as db:
        db.execute("UPDATE processes SET runner_pid = NULL WHERE pid = ?", (pid,))


def request_kill(store: Store, pid: int) -> None:
    with store.transaction() as db:
        db.execute("UPDATE processes SET kill_requested = 1 WHERE pid = ?", (pid,))


def kill_requested(store: Store, pid: int) -> bool:
    row = store.one("SELECT kill_requested FROM processes WHERE pid = ?", (pid,))
    return bool(row and row[0])


def decide(store: Store, pid: int, call_id: str, allow: bool) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT OR REPLACE INTO approvals VALUES (?, ?, ?, ?)",
            (pid, call_id, int(allow), time.time()),
        )


def decision(store: Store, pid: int, call_id: str) -> bool | None:
    row = store.one("SELECT allow FROM approvals WHERE pid = ? AND call_id = ?", (pid, call_id))
    return None if row is None else bool(row[0])
