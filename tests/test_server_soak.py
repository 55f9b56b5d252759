"""The soak (benchmarks/soak.py) in small: 8 streaming clients for ~25 s against a real
`llmos serve`, with cut streams, bad requests, users, priorities, `n`, stop strings, JSON schemas
and tool calls. The long run is `make soak`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def test_a_short_soak_leaks_nothing_and_never_fails(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "0.4", "--clients", "8", "--window", "8"]
        + ["--kv-cache-memory", "128MiB", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    print(run.stdout[-3000:])
    summary = json.loads(out.read_text())["summary"]
    assert summary["by_kind"]["cut"] > 0 and summary["by_kind"]["bad"] > 0
    assert summary["by_status"].get("200", 0) > 20
    assert summary["errors"] == []
    assert not any(int(status) >= 500 for status in summary["by_status"])
    assert summary["max_orphaned_while_running"] == 0
    assert summary["max_kv_used_while_running"] > 0  # the scrapes saw the load
    after = summary["after"]
    assert after["llmos_kv_blocks_orphaned"] == 0
    assert after["llmos_kv_blocks_used"] == after["llmos_kv_blocks_pinned"]
    assert summary["passed"] and run.returncode == 0, run.stdout[-2000:]
