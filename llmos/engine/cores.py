"""How many threads the engine's steps use, following what else runs on the machine's cores.

llmos bounds OpenMP's spin-wait (llmos/__init__.py): on cores of its own, a worker waits out
the short gaps between a step's ~150 parallel regions spinning, which makes decode about 3x
faster than sleeping at once. When another process takes a core, though, a worker that shares
a core with it is often descheduled, every region's barrier waits for it, and spinning burns
the time the other worker needs: throughput falls to a third. One thread per free core has no
such barrier to wait at. So every `interval` seconds the governor reads the CPU time the
whole machine used (`/proc/stat`) less this process's own (`/proc/self/stat`): what other
processes took. The step's thread count becomes the cores they leave free (rounded; at least
one, at most the count the engine started with), once two readings in a row agree.

Only the CPU device, only where `/proc` has the figures, and never in deterministic mode
(the pure-torch tiled path's sums may depend on the thread count). The native kernels split
work by output, so their results do not depend on the thread count.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy() -> int | None:
    """Ticks all CPUs spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return user + nice + system + irq + softirq + steal


def _own_busy() -> int | None:
    """Ticks this process's threads spent on a CPU (user + system)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


class CoreGovernor:
    """Call `tick()` from the thread that runs the steps (OpenMP's thread count is per
    thread); it reads /proc at most once per `interval` and sets torch's thread count."""

    def __init__(self, interval: float = 0.5, cores: int | None = None) -> None:
        self.max_threads = torch.get_num_threads()
        self.threads = self.max_threads
        self.cores = cores or os.cpu_count() or 1
        self.interval = interval
        self.others = 0.0  # cores other processes used over the last interval
        self.switches = 0
        self._pending: int | None = None
        self._last = self._read()
        self.enabled = self.max_threads > 1 and self._last is not None

    def _read(self) -> tuple[float, int, int] | None:
        machine, own = _machine_busy(), _own_busy()
        if machine is None or own is None:
            return None
        return time.monotonic(), machine, own

    def tick(self) -> int:
        """The thread count for this step (changed only after two agreeing readings)."""
        if not self.enabled:
            return self.threads
        now = time.monotonic()
        assert self._last is not None
        if now - self._last[0] < self.interval:
            return self.threads
        reading = self._read()
        if reading is None:
            return self.threads
        (t0, m0, o0), (t1, m1, o1) = self._last, reading
        self._last = reading
        self.others = max(0.0, ((m1 - m0) - (o1 - o0)) / TICK / (t1 - t0))
        want = max(1, min(self.max_threads, int(self.cores - self.others + 0.5)))
        if want == self.threads:
            self._pending = None
        elif self._pending != want:
            self._pending = want  # wait for a second reading to agree
        else:
            log.info(
                "other processes use %.1f of %d cores: %d engine threads (was %d)",
                self.others,
                self.cores,
                want,
                self.threads,
            )
            self.threads, self._pending = want, None
            self.switches += 1
            torch.set_num_threads(want)
        return self.threads


def adapt_threads() -> bool:
    """Whether the governor runs: on unless `LLMOS_ADAPT_THREADS=0` (or false/no/off)."""
    return os.environ.get("LLMOS_ADAPT_THREADS", "1").lower() not in ("0", "false", "no", "off")
