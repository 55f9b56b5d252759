"""Native CPU kernels (kernels.cpp), compiled for this machine on first use and cached.

`kernels()` returns the compiled module, or None where it cannot be had (no compiler, not a
CPU build, `LLMOS_NATIVE=0`); every caller keeps a pure-torch path, which is also what runs on
CUDA. The build uses `-march=native`, so the cache key includes the CPU's flags as well as the
source: a cache shared between different machines never loads a kernel built for another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

from llmos.models.cache import cache_dir, scratch_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_dir(key: str) -> Path:
    """Under the cache folder; with caching off (`LLMOS_CACHE_DIR=""`), a scratch folder."""
    return (cache_dir() or scratch_dir()) / "kernels" / key


def enabled() -> bool:
    return os.environ.get("LLMOS_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def kernels() -> ModuleType | None:
    """The compiled kernels, building them the first time (about a minute); None if unavailable."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _load() if enabled() else None
    return _state["module"]


def _load() -> ModuleType | None:
    import torch
    from torch.utils import cpp_extension

    key = hashlib.sha256(
        b"".join(f.read_bytes() for f in sorted(SOURCE.parent.glob("*.[ch]*")))
        + _cpu_flags().encode()
        + torch.__version__.encode()
        + sys.version.encode()
    ).hexdigest()[:16]
    name = f"llmos_native_{key}"
    build = _build_dir(key)
    try:
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob(f"{name}*.so")):
            log.info("building native CPU kernels in %s (once per machine)", build)
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            build_directory=str(build),
            # -fopenmp: at::parallel_for is OpenMP inlined from ATen's headers; the loader maps
            # libgomp.so.1 to the copy torch has already loaded, so there is one thread pool
            # -ffast-math: reductions vectorize, and expf gets glibc's vector variants
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers: the torch paths remain
        log.warning(
            "native CPU kernels unavailable (%s: %s); using the torch paths",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None
    return module


__all__ = ["kernels", "enabled"]
