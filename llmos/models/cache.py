"""Where llmos keeps what it derives once per machine: converted weights, built kernels.

`LLMOS_CACHE_DIR` names the folder; an empty value turns every cache off (each process then
converts and builds afresh, in a temporary folder removed at exit); unset, ~/.cache/llmos.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path | None:
    """The cache folder, or None when `LLMOS_CACHE_DIR` is set empty (caching off)."""
    value = os.environ.get("LLMOS_CACHE_DIR")
    if value == "":
        return None
    return Path(value) if value else Path.home() / ".cache" / "llmos"


@functools.cache
def scratch_dir() -> Path:
    """A folder for this process alone, removed at exit: where caching is off."""
    path = Path(tempfile.mkdtemp(prefix="llmos-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
