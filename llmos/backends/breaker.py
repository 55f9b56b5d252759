"""A circuit breaker per pool member: closed → (N failures in a row) open for T seconds →
half-open (one probe at a time) → closed on the probe's success, open again on its failure.

Pure bookkeeping over an injected clock, so tests step time exactly. A `Retry-After` from the
server also blocks the member until then, whatever the breaker says."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"  # cooling down: no request is sent
    HALF_OPEN = "half_open"  # cooled: one probe may go


@dataclass(slots=True)
class Breaker:
    failures: int  # consecutive failures that open the breaker
    cooldown: float  # seconds open before a probe
    clock: Callable[[], float]
    state: State = State.CLOSED
    consecutive: int = 0
    opened_at: float = 0.0
    blocked_until: float = 0.0  # a server's Retry-After
    probing: bool = False  # a half-open probe is in flight
    opened: int = 0  # how many times it opened (for health and tests)
    history: list[tuple[str, float]] = field(default_factory=list)  # (state, at)

    def _refresh(self) -> None:
        if self.state is State.OPEN and self.clock() >= self.opened_at + self.cooldown:
            self._to(State.HALF_OPEN)

    def _to(self, state: State) -> None:
        self.state = state
        self.history.append((state.value, self.clock()))

    def ready_at(self) -> float | None:
        """When a request may be sent (now or later); None while a probe is in flight."""
        self._refresh()
        at = self.blocked_until
        if self.state is State.OPEN:
            at = max(at, self.opened_at + self.cooldown)
        elif self.state is State.HALF_OPEN and self.probing:
            return None
        return at

    def acquire(self) -> bool:
        """Take the right to send one request now (a half-open breaker gives it once)."""
        at = self.ready_at()
        if at is None or at > self.clock():
            return False
        if self.state is State.HALF_OPEN:
            self.probing = True
        return True

    def success(self) -> None:
        self.consecutive, self.probing = 0, False
        if self.state is not State.CLOSED:
            self._to(State.CLOSED)

    def failure(self) -> None:
        self._refresh()
        self.consecutive += 1
        was_probe, self.probing = self.probing, False
        if was_probe or (self.state is State.CLOSED and self.consecutive >= self.failures):
            self.opened_at, self.opened = self.clock(), self.opened + 1
            self._to(State.OPEN)

    def neutral(self) -> None:
        """The attempt ended without saying anything about health (a bad request, a cancel)."""
        self.probing = False

    def block(self, seconds: float) -> None:
        self.blocked_until = max(self.blocked_until, self.clock() + seconds)

    def health(self) -> str:
        self._refresh()
        if self.state is State.CLOSED and self.blocked_until > self.clock():
            return "rate_limited"
        return {State.CLOSED: "healthy", State.OPEN: "cooling", State.HALF_OPEN: "half_open"}[
            self.state
        ]
