"""The console's eval reports: runs from the eval history in the kernel's DB, each rendered as
the same HTML page `llmos eval --html` writes. It lives in cli/ because the server may not
import llmos.evals (ARCHITECTURE.md's layers); `llmos serve` hands it to the console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class EvalHistoryReports:
    def __init__(self, db: str | Path) -> None:
        from llmos.evals.history import History

        self.history = History(db)  # its own connection; the tables are made when missing

    def runs(self) -> list[dict[str, Any]]:
        rows = self.history.store.query(
            "SELECT run_id, suite_name, started_at, duration_s, passed FROM eval_runs"
            " ORDER BY started_at DESC LIMIT 200"
        )
        return [
            {
                "run_id": r["run_id"],
                "suite": r["suite_name"],
                "started_at": r["started_at"],
                "duration_s": r["duration_s"],
                "passed": bool(r["passed"]),
            }
            for r in rows
        ]

    def html(self, run_id: str) -> str | None:
        from llmos.evals.html import render_html

        store = self.history.store
        run = store.one("SELECT * FROM eval_runs WHERE run_id = ?", (run_id,))
        if run is None:
            return None
        cases = [
            {**dict(c), "passed": bool(c["passed"]), "assertions": json.loads(c["assertions"])}
            for c in store.query(
                "SELECT cell, test, repeat, passed, score, output, latency_s, tokens, cost,"
                " assertions FROM eval_cases WHERE run_id = ? ORDER BY cell, test, repeat",
                (run_id,),
            )
        ]
        result = {
            "run_id": run["run_id"],
            "suite": {
                "name": run["suite_name"],
                "path": run["suite_path"],
                "hash": run["suite_hash"],
            },
            "started_at": run["started_at"],
            "duration_s": run["duration_s"],
            "repeat": run["repeat"],
            "cells": json.loads(run["cells"]),
            "gates": json.loads(run["gates"]),
            "cases": cases,
        }
        return render_html(result)
