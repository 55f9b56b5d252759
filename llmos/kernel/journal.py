"""Processes and their transcripts in the store: create, append a step (with its usage row, in
one transaction), load, and the flags other OS processes set (kill, approvals)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from llmos.kernel import process
from llmos.kernel.process import (
    Process,
    Status,
    Step,
    step_from_json,
    step_to_json,
)
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
    *,
    parent: int | None = None,
    key: str | None = None,
) -> int:
    """A new process row. With `key` (a sub-agent's stable spawn key) it is made at most once:
    the row that key already names is returned instead, so a resumed fork spawns no twin."""
    now = time.time()
    with store.transaction() as db:
        if key is not None:
            row = db.execute("SELECT pid FROM processes WHERE spawn_key = ?", (key,)).fetchone()
            if row is not None:
                return int(row[0])
        cur = db.execute(
            "INSERT INTO processes (program, program_name, program_version, prompt_hash, input,"
            " workspace, owner, priority, backend, status, created_at, updated_at, runner_pid,"
            " parent_pid, spawn_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                parent,
                key,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid


def append(store: Store, proc: Process, step: Step, *, model: str | None = None) -> None:
    """Commit one step (and, for a metered step, its usage row) before anything else happens."""
    seq = len(proc.steps)
    now = time.time()
    sha = getattr(step, "sha256", None)
    with store.transaction() as db:
        db.execute(
            "INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?)",
            (proc.pid, seq, step.kind, step_to_json(step), sha, now),
        )
        if isinstance(step, process.METERED_STEPS):  # (memory registers its summaries)
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
        parent=row["parent_pid"],
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


def children(store: Store, pid: int) -> list[int]:
    """The pids `pid` spawned, oldest first."""
    rows = store.query("SELECT pid FROM processes WHERE parent_pid = ? ORDER BY pid", (pid,))
    return [r[0] for r in rows]


def descendants(store: Store, pid: int) -> list[int]:
    """Every process below `pid` in the tree, children before their own children."""
    out, frontier = [], [pid]
    while frontier:
        below = [c for p in frontier for c in children(store, p)]
        out += below
        frontier = below
    return out


def tree_usage(store: Store, root: int) -> tuple[int, float]:
    """Tokens and cost of `root` and every process below it (one budget for the tree)."""
    pids = [root, *descendants(store, root)]
    marks = ",".join("?" * len(pids))
    row = store.one(
        "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0), COALESCE(SUM(cost), 0)"
        f" FROM usage WHERE pid IN ({marks})",
        tuple(pids),
    )
    assert row is not None
    return int(row[0]), float(row[1])


def root_of(store: Store, pid: int) -> int:
    while True:
        row = store.one("SELECT parent_pid FROM processes WHERE pid = ?", (pid,))
        if row is None or row[0] is None:
            return pid
        pid = row[0]
