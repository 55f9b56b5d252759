"""Every eval run in the kernel's SQLite (llmos/kernel/store.py, with its own registered
migration): the suite hash, each cell's configuration, model file hash and engine flags, the
seed, and every case's verdict. `--baseline last|RUN_ID` lists the cases that flipped."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from llmos.kernel.store import Store, migration


@migration
def m101_eval_runs(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE eval_runs (
        run_id TEXT PRIMARY KEY,
        suite_name TEXT NOT NULL,
        suite_path TEXT NOT NULL,
        suite_hash TEXT NOT NULL,
        started_at REAL NOT NULL,
        duration_s REAL NOT NULL,
        repeat INTEGER NOT NULL,
        seed INTEGER,
        cells TEXT NOT NULL,  -- JSON: each cell's config, engine flags, model file hash, totals
        gates TEXT NOT NULL,  -- JSON
        passed INTEGER NOT NULL)""")
    db.execute("""CREATE TABLE eval_cases (
        run_id TEXT NOT NULL REFERENCES eval_runs(run_id),
        cell TEXT NOT NULL,
        test TEXT NOT NULL,
        repeat INTEGER NOT NULL,
        passed INTEGER NOT NULL,
        score REAL NOT NULL,
        output TEXT NOT NULL,
        latency_s REAL NOT NULL,
        tokens INTEGER NOT NULL,
        cost REAL NOT NULL,
        assertions TEXT NOT NULL,  -- JSON
        PRIMARY KEY (run_id, cell, test, repeat))""")
    db.execute("CREATE INDEX eval_runs_suite ON eval_runs(suite_path, started_at)")


class History:
    def __init__(self, db: str | Path) -> None:
        self.store = Store(db)

    def save(self, result: dict[str, Any], seed: int | None = None) -> None:
        s = result["suite"]
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO eval_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (result["run_id"], s["name"], s["path"], s["hash"], result["started_at"],
                 result["duration_s"], result.get("repeat", 1), seed, json.dumps(result["cells"]),
                 json.dumps(result["gates"]), int(all(g["passed"] for g in result["gates"]))),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO eval_cases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(result["run_id"], c["cell"], c["test"], c["repeat"], int(c["passed"]),
                  c["score"], c["output"], c["latency_s"], c["tokens"], c["cost"],
                  json.dumps(c["assertions"])) for c in result["cases"]],
            )  # fmt: skip

    def resolve(self, ref: str, suite_path: str, exclude: str | None = None) -> str | None:
        """`last`: the newest earlier run of this suite file; else a run id."""
        if ref == "last":
            row = self.store.one(
                "SELECT run_id FROM eval_runs WHERE suite_path = ? AND run_id != ? "
                "ORDER BY started_at DESC LIMIT 1",
                (suite_path, exclude or ""),
            )
        else:
            row = self.store.one("SELECT run_id FROM eval_runs WHERE run_id = ?", (ref,))
        return row["run_id"] if row else None

    def verdicts(self, run_id: str) -> dict[tuple[str, str], bool]:
        """(cell, test) → passed on every repeat."""
        out: dict[tuple[str, str], bool] = {}
        for r in self.store.query(
            "SELECT cell, test, MIN(passed) AS ok FROM eval_cases WHERE run_id = ? "
            "GROUP BY cell, test",
            (run_id,),
        ):
            out[(r["cell"], r["test"])] = bool(r["ok"])
        return out

    def runs(self, suite_path: str | None = None) -> list[dict[str, Any]]:
        rows = self.store.query(
            "SELECT run_id, suite_name, suite_hash, started_at, duration_s, repeat, passed "
            "FROM eval_runs" + (" WHERE suite_path = ?" if suite_path else "")
            + " ORDER BY started_at", (suite_path,) if suite_path else (),
        )  # fmt: skip
        return [dict(r) for r in rows]

    def close(self) -> None:
        self.store.close()


def flips(now: dict[str, Any], was: dict[tuple[str, str], bool]) -> list[dict[str, Any]]:
    """The (cell, test) pairs whose verdict differs from the baseline's (same cell ids: the
    same suite's matrix position)."""
    mine: dict[tuple[str, str], bool] = {}
    for c in now["cases"]:
        key = (c["cell"], c["test"])
        mine[key] = mine.get(key, True) and bool(c["passed"])
    return [
        {"cell": cell, "test": test, "was": was[(cell, test)], "now": ok}
        for (cell, test), ok in mine.items()
        if (cell, test) in was and was[(cell, test)] != ok
    ]
