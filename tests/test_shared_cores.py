"""Every entry point runs OpenMP with a passive wait policy, so the engine degrades gracefully
when other work shares the cores (issue 12, defect 14; `benchmarks/contention.py` measures
it). The policy is read when torch loads OpenMP, so it must be in the environment by then."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(code: str, **env: str | None) -> str:
    full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()


def test_importing_llmos_sets_passive_before_torch_loads() -> None:
    code = "import llmos, os, sys; print(os.environ['OMP_WAIT_POLICY'], llmos.OMP_LATE)"
    assert _run(code, OMP_WAIT_POLICY=None) == "PASSIVE False"


def test_a_policy_the_user_set_wins() -> None:
    code = "import llmos, os; print(os.environ['OMP_WAIT_POLICY'], llmos.OMP_LATE)"
    assert _run(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE False"


def test_torch_imported_first_is_detected_and_the_engine_warns() -> None:
    code = (
        "import torch, logging, llmos\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "print(llmos.OMP_LATE)\n"
        "from llmos import LLM\n"
        "LLM(kv_cache_memory='16MiB')\n"
    )
    full = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
    assert "OMP_WAIT_POLICY=PASSIVE" in out.stderr


def test_the_cli_sets_the_policy_before_it_loads_torch() -> None:
    """`llmos serve`, `run`, `generate`...: the console script imports llmos.cli.main, whose
    package sets the policy; torch loads only later, inside the commands."""
    script = (BIN / "llmos").read_text()
    assert "from llmos.cli.main import" in script
    code = (
        "import sys; from llmos.cli.main import app; import os, llmos; "
        "print(os.environ['OMP_WAIT_POLICY'], llmos.OMP_LATE)"
    )
    assert _run(code, OMP_WAIT_POLICY=None) == "PASSIVE False"
