"""The core governor with real busy processes: the engine's thread count drops to the cores
they leave free, and comes back when they end."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from llmos.engine.cores import CoreGovernor

CORES = os.cpu_count() or 1


def _settle(gov: CoreGovernor, want: int, seconds: float = 8.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and gov.tick() != want:
        time.sleep(0.05)
    return gov.threads


@pytest.mark.skipif(CORES < 2, reason="needs two cores")
def test_threads_follow_the_cores_other_processes_leave_free() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gov = CoreGovernor(interval=0.3)
        assert gov.enabled and gov.max_threads == 2
        hogs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(CORES - 1)
        ]
        try:
            assert _settle(gov, 1) == 1, f"others used {gov.others:.2f} cores"
            assert torch.get_num_threads() == 1
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        assert _settle(gov, 2) == 2, f"others still use {gov.others:.2f} cores"
        assert torch.get_num_threads() == 2 and gov.switches == 2
    finally:
        torch.set_num_threads(before)


def test_one_thread_or_off_leaves_the_count_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmos.engine.cores import adapt_threads

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gov = CoreGovernor(interval=0.0)
        assert not gov.enabled and gov.tick() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("LLMOS_ADAPT_THREADS", "0")
    assert not adapt_threads()
    monkeypatch.setenv("LLMOS_ADAPT_THREADS", "1")
    assert adapt_threads()
