"""Priority means one thing everywhere: higher runs first, and may preempt lower. Checked
through each entry point: the engine, the kernel, the CLI (the server's is in
test_server_scheduling.py). (Issue 12, defect 10.)"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from llmos.backends.local import LocalBackend
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.kernel import Kernel, Program

LLMOS = str(Path(sys.executable).parent / "llmos")
LONG = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_engine_runs_higher_priority_first_and_preempts_lower() -> None:
    engine = LLMEngine(kv_cache_memory="32MiB", max_num_seqs=1)
    engine.add_request("low", "Count slowly to one hundred.", LONG, priority=0)
    engine.step()  # low is running now
    engine.add_request("high", "Say hi.", SHORT, priority=5)
    engine.add_request("later-low", "Say hi.", SHORT, priority=-1)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "low", "later-low"]
    assert engine.stats().num_preemptions >= 1


def test_kernel_priority_reaches_the_engine_higher_first() -> None:
    """Two processes on one engine that runs one sequence at a time: the low-priority one is
    spawned first, yet the high-priority one finishes first (it preempts)."""
    backend = LocalBackend(kv_cache_memory="32MiB", max_num_seqs=1)
    with Kernel(backend=backend, db=":memory:") as kernel:
        low_prog = Program(name="low", sampling={"max_tokens": 96, "ignore_eos": True})
        high_prog = Program(name="high", sampling={"max_tokens": 4, "ignore_eos": True})
        low = kernel.spawn(low_prog, "Count slowly to one hundred.", priority=0)
        time.sleep(0.5)  # low is in the engine by now
        high = kernel.spawn(high_prog, "Say hi.", priority=10)
        order: list[int] = []
        deadline = time.monotonic() + 300
        while len(order) < 2 and time.monotonic() < deadline:
            order += [p for p in (low, high) if p not in order and kernel.get(p).status.finished]
            time.sleep(0.02)
        procs = [kernel.wait(pid, timeout=10) for pid in (low, high)]
    assert all(p.status.value == "done" for p in procs), [p.status for p in procs]
    assert order == [high, low]


def test_cli_run_priority_is_stored_and_documented(tmp_path: Path) -> None:
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps([{"content": "done"}]))
    db = tmp_path / "k.db"
    help_text = subprocess.run([LLMOS, "run", "--help"], capture_output=True, text=True).stdout
    assert "Higher runs first" in " ".join(help_text.split())
    run = subprocess.run(
        [
            LLMOS,
            "run",
            "say done",
            "--priority",
            "7",
            "--model",
            f"scripted:{turns}",
            "--db",
            str(db),
            "-w",
            str(tmp_path),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT priority FROM processes").fetchall() == [(7,)]
