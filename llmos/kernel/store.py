"""SQLite, in WAL mode so `llmos ps` can read while a run writes. Migrations are registered
in code by a decorator and applied once each, in order. A step and its usage row commit in one
transaction, before the next LLM call: a crash loses at most the call in flight."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []
migration = MIGRATIONS.append


@migration
def m001_processes(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE processes (
        pid INTEGER PRIMARY KEY AUTOINCREMENT,
        program TEXT NOT NULL,  -- the program spec as JSON
        program_name TEXT NOT NULL,
        program_version TEXT NOT NULL,
        prompt_hash TEXT NOT NULL,
        input TEXT NOT NULL,
        workspace TEXT NOT NULL,
        owner TEXT,
        priority INTEGER NOT NULL DEFAULT 0,
        backend TEXT,
        status TEXT NOT NULL,
        answer TEXT,
        reason TEXT,
        report TEXT,  -- the give-up report as JSON
        elapsed REAL NOT NULL DEFAULT 0,
        runner_pid INTEGER,  -- the OS process running it now
        kill_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL)""")


@migration
def m002_steps(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE steps (
        pid INTEGER NOT NULL REFERENCES processes(pid),
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        sha256 TEXT,  -- of a tool result's text
        created_at REAL NOT NULL,
        PRIMARY KEY (pid, seq))""")


@migration
def m003_usage(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE usage (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        pid INTEGER NOT NULL REFERENCES processes(pid),
        seq INTEGER NOT NULL,  -- the model turn's step
        user TEXT,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        engine_seconds REAL NOT NULL,
        cost REAL NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (pid, seq))""")
    db.execute("CREATE INDEX usage_user ON usage(user)")


@migration
def m004_approvals_and_budgets(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE approvals (
        pid INTEGER NOT NULL REFERENCES processes(pid),
        call_id TEXT NOT NULL,
        allow INTEGER NOT NULL,
        decided_at REAL NOT NULL,
        PRIMARY KEY (pid, call_id))""")
    db.execute("""CREATE TABLE budgets (
        user TEXT PRIMARY KEY,
        max_tokens INTEGER,
        max_cost REAL)""")


@migration
def m005_process_tree(db: sqlite3.Connection) -> None:
    """Sub-agents: a child's parent, and the stable key its spawn was journaled under (a
    resumed fork finds the child it already made instead of making it twice)."""
    db.execute("ALTER TABLE processes ADD COLUMN parent_pid INTEGER REFERENCES processes(pid)")
    db.execute("ALTER TABLE processes ADD COLUMN spawn_key TEXT")
    db.execute("CREATE UNIQUE INDEX processes_spawn_key ON processes(spawn_key)")
    db.execute("CREATE INDEX processes_parent ON processes(parent_pid)")


def default_db_path() -> Path:
    env = os.environ.get("LLMOS_DB")
    return Path(env) if env else Path.home() / ".local" / "share" / "llmos" / "llmos.db"


class Store:
    """One connection, shared by the kernel's threads under a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self.db.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    def migrate(self) -> list[str]:
        with self.transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, "
                "applied_at REAL NOT NULL)"
            )
            done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
            applied = []
            for fn in MIGRATIONS:
                if fn.__name__ not in done:
                    fn(db)
                    db.execute("INSERT INTO _migrations VALUES (?, ?)", (fn.__name__, time.time()))
                    applied.append(fn.__name__)
        return applied

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def close(self) -> None:
        with self.lock:
            self.db.close()
