"""What a Python tool prints goes into its result, not the kernel's terminal. `sys.stdout` and
`sys.stderr` become routers: writes from a thread running a tool land in that call's `Sink`
(which keeps the first `cap` characters and counts the rest), every other write passes on.
Threads a tool starts itself, and subprocesses writing to the file descriptors, are not
routed."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()
_install_lock = threading.Lock()


class Sink:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[str] = []
        self.kept = 0
        self.total = 0

    def write(self, text: str) -> None:
        self.total += len(text)
        if self.kept < self.cap:
            piece = text[: self.cap - self.kept]
            self.parts.append(piece)
            self.kept += len(piece)

    def text(self) -> str:
        out = "".join(self.parts)
        if self.total > self.kept:
            out += f"\n[... printed {self.total} characters, cut at {self.cap}]"
        return out


class _Router:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        sink: Sink | None = getattr(_local, "sink", None)
        if sink is None:
            return self.inner.write(text)
        sink.write(text)
        return len(text)

    def flush(self) -> None:
        if getattr(_local, "sink", None) is None:
            self.inner.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty...
        return getattr(self.inner, name)


def _install() -> None:
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, _Router):
                setattr(sys, name, _Router(stream))


@contextmanager
def into(sink: Sink) -> Iterator[Sink]:
    """Send this thread's prints to `sink` while the block runs."""
    _install()
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = None
