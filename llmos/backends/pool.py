"""Several backends under one name: retries with backoff (honouring `Retry-After`), a policy
per error kind (retry, fall back, fail), a circuit breaker per member, and fallbacks on error,
on timeout and on context overflow. The pool is a `Backend`, so the kernel loop does not
change; the member that answered is named in `ChatResult.backend`.

No request goes to a member whose breaker is open or whose `Retry-After` has not passed. When
every member is cooling, `when_all_cooling` decides: "wait" (sleep until the first is ready, up
to `max_wait` seconds, never polling) or "fail" (a `PoolCoolingError` at once)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import openai

from llmos.backends.base import Backend, ChatRequest, ChatResult, Message
from llmos.backends.breaker import Breaker

ACTIONS = ("retry", "fallback", "fail")
# What each kind of error does by default, and whether it counts against the member's health.
DEFAULT_POLICY: dict[str, str] = {
    "rate_limit": "retry",  # 429: wait for Retry-After (or back off), meanwhile others serve
    "server": "retry",  # 5xx
    "timeout": "fallback",  # no answer within the member's timeout (a hung server)
    "connection": "fallback",  # refused, reset, or the connection died mid-response
    "context": "fallback",  # the prompt is too long for this member: a longer one may take it
    "auth": "fallback",  # 401/403: this member's key, not the request
    "not_found": "fallback",  # 404: the model is not served there
    "bad_request": "fail",  # 400/422: the request itself is wrong, everywhere
    "other": "fallback",  # any other exception from a backend
}
UNHEALTHY = {"rate_limit", "server", "timeout", "connection", "auth", "not_found", "other"}
PRICE_FIELDS = ("prompt_per_mtok", "cached_per_mtok", "completion_per_mtok", "per_engine_second")


class PoolError(RuntimeError):
    """No member could answer; `attempts` says what each try met."""

    def __init__(self, message: str, attempts: list[Attempt]) -> None:
        super().__init__(message)
        self.attempts = attempts


class PoolCoolingError(PoolError):
    """Every member left is cooling down (or rate-limited) past what the pool may wait."""


class ContextOverflowError(ValueError):
    """The prompt does not fit any member's context window."""


@dataclass(slots=True, frozen=True)
class Attempt:
    member: str
    outcome: str  # "ok" or an error kind of DEFAULT_POLICY
    action: str  # "answered", "retry", "fallback", "fail", "skipped"
    at: float  # the pool's clock when the attempt ended
    detail: str = ""
    started: float = 0.0  # when it was sent


@dataclass(slots=True)
class Member:
    """One backend of the pool and its settings (a price of the meter's Price fields, a context
    window that overrides the backend's, a per-attempt timeout, and its error policy)."""

    backend: Backend
    price: dict[str, float] | None = None
    context_window: int | None = None
    timeout: float | None = None
    policy: dict[str, str] = field(default_factory=dict)
    breaker: Breaker | None = None  # set by the pool
    calls: int = 0  # requests sent to it
    failures: int = 0

    def __post_init__(self) -> None:
        for kind, action in self.policy.items():
            if kind not in DEFAULT_POLICY:
                raise ValueError(
                    f"policy: unknown error kind {kind!r}; use one of {', '.join(DEFAULT_POLICY)}"
                )
            if action not in ACTIONS:
                raise ValueError(f"policy.{kind}: {action!r} is not one of {', '.join(ACTIONS)}")
        for key, value in (self.price or {}).items():
            if key not in PRICE_FIELDS:
                raise ValueError(f"price: unknown field {key!r}; use {', '.join(PRICE_FIELDS)}")
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"price.{key}: must be a number >= 0, got {value!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {self.timeout!r}")
        if self.context_window is None:
            self.context_window = self.backend.context_window
        client = getattr(self.backend, "client", None)
        if isinstance(client, openai.AsyncOpenAI) and client.max_retries:
            # the pool owns retries: the client's own would hit a cooling or rate-limited member
            self.backend.client = client.with_options(max_retries=0)  # type: ignore[attr-defined]
        self.policy = {**DEFAULT_POLICY, **self.policy}

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def kind(self) -> str:
        return self.backend.kind


@dataclass(slots=True)
class PoolConfig:
    failures: int = 3  # consecutive failures that open a member's breaker
    cooldown: float = 30.0  # seconds a breaker stays open before a half-open probe
    retries: int = 2  # more tries of one member per request, for errors whose policy is retry
    backoff: float = 0.5  # seconds before the first retry, doubling up to max_backoff
    max_backoff: float = 8.0
    max_retry_after: float = 60.0  # a longer Retry-After: fall back instead of waiting for it
    timeout: float = 120.0  # seconds per attempt, unless the member sets its own
    when_all_cooling: str = "wait"  # or "fail"
    max_wait: float = 30.0  # seconds a request may wait for a cooling member

    def __post_init__(self) -> None:
        if not isinstance(self.failures, int) or self.failures < 1:
            raise ValueError(f"failures: must be an integer >= 1, got {self.failures!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries: must be an integer >= 0, got {self.retries!r}")
        for name in ("cooldown", "backoff", "max_backoff", "max_retry_after", "max_wait"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name}: must be a number of seconds >= 0, got {value!r}")
        if not isinstance(self.timeout, int | float) or self.timeout <= 0:
            raise ValueError(f"timeout: must be a number of seconds > 0, got {self.timeout!r}")
        if self.when_all_cooling not in ("wait", "fail"):
            raise ValueError(
                f"when_all_cooling: must be 'wait' or 'fail', got {self.when_all_cooling!r}"
            )


def classify(exc: BaseException) -> tuple[str, float | None]:
    """An exception → (error kind, the server's Retry-After in seconds or None)."""
    if isinstance(exc, ContextOverflowError):
        return "context", None
    if isinstance(exc, TimeoutError | openai.APITimeoutError):
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None
    if isinstance(exc, openai.APIStatusError):
        wait = retry_after(exc.response.headers)
        status = exc.status_code
        if status == 429:
            return "rate_limit", wait
        if status >= 500:
            return "server", wait
        if status in (401, 403):
            return "auth", None
        if status == 404:
            return "not_found", None
        if status == 408:
            return "timeout", None
        body = str(exc.body or exc.message).lower()
        if "context_length" in body or "maximum context" in body or "too long" in body:
            return "context", None
        return "bad_request", None
    return "other", None


def retry_after(headers: Any) -> float | None:
    """`retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    try:
        if ms is not None:
            return max(0.0, float(ms) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_tz(value)
        return None if when is None else max(0.0, email.utils.mktime_tz(when) - time.time())


class Pool:
    kind = "pool"

    def __init__(
        self,
        members: list[Member | Backend],
        config: PoolConfig | None = None,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if not members:
            raise ValueError("members: a pool needs at least one backend")
        self.config = config or PoolConfig()
        self.clock = clock
        self._sleep = sleep  # injected (a test clock); None: a nap a finished probe cuts short
        self.members = [m if isinstance(m, Member) else Member(m) for m in members]
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: a backend is named twice in {names}")
        for m in self.members:
            m.breaker = Breaker(self.config.failures, self.config.cooldown, clock)
        self.name = name or f"pool:[{', '.join(names)}]"
        windows = [m.context_window for m in self.members]
        self.context_window = None if None in windows else max(windows)  # type: ignore[type-var]
        self.enforces_schema = all(getattr(m.backend, "enforces_schema", False) for m in self)
        self.log: deque[Attempt] = deque(maxlen=1000)
        self._waiters: list[asyncio.Future[None]] = []

    def __iter__(self) -> Iterator[Member]:
        """The members, in order of preference."""
        return iter(self.members)

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def health(self) -> list[dict[str, Any]]:
        return [
            {
                "name": m.name,
                "state": m.breaker.health(),
                "calls": m.calls,
                "failures": m.failures,
                "context_window": m.context_window,
            }
            for m in self.members
            if m.breaker is not None
        ]

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]]) -> int:
        """As the longest-context member counts: the loop fits the prompt to its window."""
        widest = max(self.members, key=lambda m: m.context_window or 1 << 60)
        return widest.backend.count_tokens(messages, tools)

    def _fits(self, m: Member, request: ChatRequest) -> bool:
        if m.context_window is None:
            return True
        need = m.backend.count_tokens(request.messages, request.tools)
        return need + int(request.sampling.get("max_tokens") or 256) <= m.context_window

    async def chat(self, request: ChatRequest) -> ChatResult:
        cfg = self.config
        attempts: list[Attempt] = []
        start = self.clock()
        tries: dict[str, int] = {}
        not_before: dict[str, float] = {}  # this request's backoff per member
        left = [m for m in self.members if self._fits(m, request)]
        if not left:
            windows = ", ".join(f"{m.name}: {m.context_window}" for m in self.members)
            raise ContextOverflowError(
                f"pool {self.name}: the prompt does not fit any member's context window "
                f"({windows} tokens)"
            )
        while True:
            if not left:
                raise PoolError(self._why(attempts, "every member failed"), attempts)
            now = self.clock()
            m = next(
                (x for x in left if not_before.get(x.name, 0) <= now and x.breaker.acquire()),
                None,
            )
            if m is None:
                await self._wait(left, not_before, start, attempts)
                continue
            m.calls += 1
            sent = self.clock()
            try:
                timeout = m.timeout or cfg.timeout
                result = await asyncio.wait_for(m.backend.chat(request), timeout)
            except asyncio.CancelledError:
                m.breaker.neutral()
                raise
            except Exception as exc:  # noqa: BLE001 - every backend error is classified
                kind, wait = classify(exc)
                action = m.policy[kind]
                if kind in UNHEALTHY:
                    m.failures += 1
                    m.breaker.failure()
                else:
                    m.breaker.neutral()
                if wait is not None:
                    m.breaker.block(wait)  # the server's word holds for every request
                n = tries[m.name] = tries.get(m.name, 0) + 1
                if action == "retry" and (
                    n > cfg.retries or (wait is not None and wait > cfg.max_retry_after)
                ):
                    action = "fallback"  # out of retries here: the next member
                detail = f"{type(exc).__name__}: {exc}"[:300]
                attempts.append(Attempt(m.name, kind, action, self.clock(), detail, sent))
                self.log.append(attempts[-1])
                if action == "fail":
                    why = self._why(attempts, f"{kind} is not retried")
                    raise PoolError(why, attempts) from exc
                if action == "fallback":
                    left.remove(m)
                else:
                    delay = min(cfg.backoff * 2 ** (n - 1), cfg.max_backoff)
                    not_before[m.name] = self.clock() + max(delay, wait or 0.0)
                continue
            finally:
                self._wake()
            m.breaker.success()
            self.log.append(Attempt(m.name, "ok", "answered", self.clock(), started=sent))
            return replace(result, backend=m.name)

    async def _wait(
        self, left: list[Member], not_before: dict[str, float], start: float, attempts: list
    ) -> None:
        """Every member left is cooling, rate-limited or backing off: wait for the first to be
        ready (or a probe to end), within max_wait, or fail as configured."""
        cfg, now = self.config, self.clock()
        deadline = start + cfg.max_wait
        gates = [m.breaker.ready_at() for m in left]  # None: a probe is in flight
        ready = [
            None if g is None else max(g, not_before.get(m.name, 0))
            for m, g in zip(left, gates, strict=True)
        ]
        states = ", ".join(
            f"{m.name}: {m.breaker.health()}"
            + (" (a probe in flight)" if at is None else f" ({max(0.0, at - now):.2f}s left)")
            for m, at in zip(left, ready, strict=True)
        )
        cooling = all(g is None or g > now for g in gates)  # not merely this request's backoff
        if cfg.when_all_cooling == "fail" and cooling:
            raise PoolCoolingError(
                f"pool {self.name}: every backend is cooling down [{states}] and "
                "when_all_cooling is 'fail'",
                attempts,
            )
        known = [at for at in ready if at is not None]
        first = min(known, default=deadline)  # a probe's end wakes the nap earlier
        if first > deadline or now >= deadline:
            raise PoolCoolingError(
                f"pool {self.name}: no backend is ready within max_wait={cfg.max_wait:g}s "
                f"[{states}]",
                attempts,
            )
        await self._nap(max(0.0, first - now))

    async def _nap(self, seconds: float) -> None:
        if self._sleep is not None:
            await self._sleep(seconds)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait({fut}, timeout=seconds)
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _wake(self) -> None:
        """An attempt ended: a request waiting on a probe looks again."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            fut.get_loop().call_soon_threadsafe(_settle, fut)

    def _why(self, attempts: list[Attempt], what: str) -> str:
        tried = "; ".join(f"{a.member}: {a.outcome} ({a.detail})" for a in attempts) or "none"
        return f"pool {self.name}: {what}; attempts: {tried}"

    def release(self, key: str) -> None:
        for m in self.members:
            m.backend.release(key)

    async def aclose(self) -> None:
        for m in self.members:
            await m.backend.aclose()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
