"""The shipped suite as a CI gate: `llmos eval evals/agent.yaml` runs llmos's own default
agent (kernel processes on the local engine, each in a fresh workspace) and must exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_agent_suite_holds_its_gates(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "llmos"
    proc = subprocess.run(
        [str(exe), "eval", str(ROOT / "evals" / "agent.yaml"), "--db", str(tmp_path / "h.db"),
         "--out", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS pass_rate [assistant]" in proc.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    cases = result["cases"]
    n_cases = len((ROOT / "evals" / "agent_cases.jsonl").read_text().splitlines())
    assert len(cases) == n_cases >= 6
    for c in cases:  # each ran as a process: it read a file first (the default schedule)
        assert c["status"] == "done", c
        assert c["tool_calls"] and c["tool_calls"][0]["name"] == "read_file", c
        assert c["tokens"] > 0 and c["cost"] > 0
        kinds = [step["kind"] for step in c["transcript"]]  # the process's steps come out
        assert "tool_call" in kinds and len(kinds) >= 2, kinds
    junit = ET.parse(tmp_path / "junit.xml").getroot()
    assert junit.find("testsuite[@name='assistant']").get("tests") == str(n_cases)
