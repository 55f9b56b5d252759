"""200 processes on one kernel (scripted models, each with its own tool) plus a handful on
the real local model: no deadlock (every wait has a timeout), all finish, every step is in
the store. Prints the makespan (`benchmarks/kernel_scale.py` records it in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_scale.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kernel_scale_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:  # the benchmark puts benchmarks/ first on sys.path, where agents.py would shadow
        sys.path[:] = path  # the openai-agents package for every later test
    return module


@pytest.mark.parametrize("local", [0, 3], ids=["scripted", "with-local-model"])
def test_200_processes_all_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local: int
) -> None:
    monkeypatch.delenv("LLMOS_BACKEND", raising=False)
    r = _bench().scale(200, local, 0.05, 120, tmp_path / "k.db", tmp_path)
    print(f"\n200 scripted + {local} local processes: makespan {r['makespan']:.2f} s")
    assert r["failed"] == {}
    assert (r["scripted_done"], r["local_done"]) == (200, local)
    assert r["steps"] >= 200 * 8 + local * 2  # 8 per scripted process, 2+ per local one
    assert r["makespan"] < 120
