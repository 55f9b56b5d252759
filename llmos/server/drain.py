"""The requests in flight, for a shutdown that outlasts its grace period.

Past the grace period each one still running is ended with an error its client reads (a 503, or
an error event at the end of a stream), rather than having its connection cut mid-body.
"""

from __future__ import annotations

from typing import Protocol

from llmos.server.errors import APIError


class Interruptible(Protocol):
    def interrupt(self, error: APIError) -> None: ...


def shutting_down() -> APIError:
    return APIError(
        503, "the server is shutting down; this request was stopped", code="shutting_down"
    )


class InFlight:
    def __init__(self) -> None:
        self._live: set[Interruptible] = set()
        self.stopped = False

    def __len__(self) -> int:
        return len(self._live)

    def add(self, gen: Interruptible) -> None:
        if self.stopped:
            gen.interrupt(shutting_down())
        self._live.add(gen)

    def discard(self, gen: Interruptible) -> None:
        self._live.discard(gen)

    def stop(self) -> None:
        """End every request in flight (and any that starts later) with a 503."""
        self.stopped = True
        for gen in list(self._live):
            gen.interrupt(shutting_down())
