"""llmos: an operating system for LLM programs.

`from llmos import LLM, SamplingParams` gives the inference engine (the CPU).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

# OpenMP's worker threads spin-wait between parallel regions unless told otherwise. On cores
# shared with other work, threads spinning for milliseconds take the CPU from the ones doing
# the work, and a server's plain requests ran 15x slower. But a worker that sleeps at once
# (PASSIVE) must be woken for each of a decode step's ~150 parallel regions, and on a VM a
# wake-up costs tens of µs: decode ran 3x slower than with spinning. So llmos bounds the spin
# (GNU OpenMP's GOMP_SPINCOUNT, about 0.1 ms here): a worker waits out the gaps inside a step
# and sleeps between steps (BENCHMARKS.md, Shared cores); other OpenMP runtimes get PASSIVE.
# The runtime reads these once, when torch loads it, so they are set here, before any llmos
# module imports torch; a value the user set wins (OMP_WAIT_POLICY alone: no spin count is
# added). `OMP_LATE`: torch was loaded first, so they cannot apply.
SPIN_COUNT = "10000"
OMP_LATE = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["LLM", "Kernel", "Program", "SamplingParams", "__version__", "tool"]

if TYPE_CHECKING:
    from llmos.engine.llm import LLM
    from llmos.engine.sampling import SamplingParams
    from llmos.kernel.kernel import Kernel
    from llmos.kernel.program import Program
    from llmos.kernel.tools import tool

_LAZY = {
    "LLM": "llmos.engine.llm",
    "SamplingParams": "llmos.engine.sampling",
    "Kernel": "llmos.kernel.kernel",
    "Program": "llmos.kernel.program",
    "tool": "llmos.kernel.tools",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import llmos` (e.g. for the CLI's --help) does not pay for torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmos' has no attribute {name!r}")
