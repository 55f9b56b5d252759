"""The kernel's metrics, read from its SQLite store at scrape time (WAL: reading never blocks a
run), so they hold for processes run by this server or by any `llmos run` on the same DB.

- `llmos_kernel_processes{state}`: processes by state;
- `llmos_kernel_tool_wait_seconds_total{program}`: seconds processes spent waiting on tools
  (a call's step to its result's step);
- `llmos_kernel_cost_total{user}` and `llmos_kernel_tokens_total{user,type}`: usage by user.

(KV blocks pinned per process come from the engine: `metrics._EngineCollector`.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

STATES = ("ready", "running", "waiting_tool", "waiting_approval", "done", "failed", "killed")
TOOL_WAIT_SQL = """SELECT p.program_name, SUM(r.created_at - c.created_at)
    FROM steps r
    JOIN steps c ON c.pid = r.pid AND c.kind = 'tool_call'
        AND json_extract(c.data, '$.call_id') = json_extract(r.data, '$.call_id')
    JOIN processes p ON p.pid = r.pid
    WHERE r.kind = 'tool_result' GROUP BY p.program_name"""
USAGE_SQL = """SELECT COALESCE(user, ''), SUM(cost), SUM(prompt_tokens), SUM(cached_tokens),
    SUM(completion_tokens) FROM usage GROUP BY user"""


class KernelCollector(Collector):
    def __init__(self, db: str | Path) -> None:
        self.db = str(db)

    def _query(self, sql: str) -> list[tuple]:
        if not Path(self.db).exists():
            return []
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5.0)
        try:
            return con.execute(sql).fetchall()
        except sqlite3.OperationalError:  # no tables yet: a kernel that never ran
            return []
        finally:
            con.close()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        by_state = dict.fromkeys(STATES, 0)
        for state, n in self._query("SELECT status, COUNT(*) FROM processes GROUP BY status"):
            by_state[state] = n
        procs = GaugeMetricFamily(
            "llmos_kernel_processes", "Kernel processes, by state.", labels=["state"]
        )
        for state, n in by_state.items():
            procs.add_metric([state], n)
        yield procs
        wait = CounterMetricFamily(
            "llmos_kernel_tool_wait_seconds",
            "Seconds processes spent waiting on tool calls, by program.",
            labels=["program"],
        )
        for program, seconds in self._query(TOOL_WAIT_SQL):
            wait.add_metric([program], seconds or 0.0)
        yield wait
        cost = CounterMetricFamily("llmos_kernel_cost", "Cost metered, by user.", labels=["user"])
        tokens = CounterMetricFamily(
            "llmos_kernel_tokens", "Tokens metered, by user and type.", labels=["user", "type"]
        )
        for user, spent, prompt, cached, completion in self._query(USAGE_SQL):
            cost.add_metric([user], spent or 0.0)
            tokens.add_metric([user, "prompt"], prompt or 0)
            tokens.add_metric([user, "cached"], cached or 0)
            tokens.add_metric([user, "completion"], completion or 0)
        yield cost
        yield tokens
