"""SIGKILL a kernel in the middle of a burst of writes from 50 processes. Afterwards the
database opens, `PRAGMA integrity_check` is ok, and every step a process saw committed (the
child notes each one in a side file after its commit returned) is in it, with its usage row;
the processes are resumable from there."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmos.backends.scripted import ScriptedBackend
from llmos.kernel import Kernel, Status

CHILD = """
import os, sys, time
from llmos.backends.scripted import ScriptedBackend, call
from llmos.kernel import Kernel, Program, journal

db, side, ws = sys.argv[1:4]
fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
commit = journal.append

def append(store, proc, step, **kw):
    commit(store, proc, step, **kw)  # returns only once the step's transaction committed
    os.write(fd, f"{proc.pid} {len(proc.steps) - 1} {step.kind}\\n".encode())

journal.append = append
turns = [{"tool_calls": [call("list_dir")]}] * 100_000
kernel = Kernel(backend=ScriptedBackend(turns), db=db)
program = Program(tools=["list_dir"], limits={"max_steps": 100_000, "stuck_after": 100_000,
                  "max_tokens": None})
for i in range(50):
    kernel.spawn(program, f"process {i}", workspace=ws)
os.write(fd, b"all spawned\\n")
time.sleep(3600)
"""


def _committed(side: Path) -> set[tuple[int, int, str]]:
    seen = set()
    for line in side.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            seen.add((int(parts[0]), int(parts[1]), parts[2]))
    return seen


@pytest.mark.parametrize("burst", [400, 3000])
def test_sigkill_mid_burst_loses_no_committed_step(tmp_path: Path, burst: int) -> None:
    db, side, script = tmp_path / "k.db", tmp_path / "committed.txt", tmp_path / "child.py"
    script.write_text(CHILD)
    side.touch()
    child = subprocess.Popen(
        [sys.executable, str(script), str(db), str(side), str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        # `burst` more commits once all 50 processes write as fast as they can
        while "all spawned" not in side.read_text() or len(_committed(side)) < 150 + burst:
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the burst never got going"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)  # no-op once it has exited
        child.wait()
    assert child.returncode == -signal.SIGKILL

    seen = _committed(side)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        steps = set(conn.execute("SELECT pid, seq, kind FROM steps"))
        usage = set(conn.execute("SELECT pid, seq FROM usage"))
        turns = {(p, s) for p, s, k in steps if k == "model_turn"}
        pids = {p for (p,) in conn.execute("SELECT pid FROM processes")}
    assert len(pids) == 50 and {p for p, _, _ in seen} <= pids
    assert seen <= steps, f"{len(seen - steps)} committed steps are missing"
    assert usage == turns  # a step and its usage row commit together, or not at all
    for pid in pids:  # each transcript is a gapless prefix
        seqs = sorted(s for p, s, _ in steps if p == pid)
        assert seqs == list(range(len(seqs)))

    # the database is usable again: a new kernel opens it and a process runs on from there
    victim = min(pids)
    with Kernel(backend=ScriptedBackend([{"content": "resumed"}] * 100_000), db=db) as kernel:
        assert len(kernel.ps()) == 50
        before = len(kernel.get(victim).steps)
        kernel.resume(victim)
        p = kernel.wait(victim, 30)
    assert p.status is Status.DONE and p.answer == "resumed" and len(p.steps) > before
