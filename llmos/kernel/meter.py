"""Metering: every token a process causes is priced and charged to the process, its owner and
its model. Remote models are priced per token; local ones per second of engine time (what
they really cost: the machine). Budgets per process (the program's limits) and per user stop
work with a reason that says which budget ran out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmos.backends.base import ChatResult
from llmos.kernel.process import JudgeCall, ProcessUsage
from llmos.kernel.program import Limits
from llmos.kernel.store import Store


@dataclass(slots=True, frozen=True)
class Price:
    prompt_per_mtok: float = 0.0  # per million uncached prompt tokens
    cached_per_mtok: float = 0.0
    completion_per_mtok: float = 0.0
    per_engine_second: float = 0.0

    def cost(self, result: ChatResult) -> float:
        u = result.usage
        return (
            (u.prompt_tokens - u.cached_tokens) * self.prompt_per_mtok
            + u.cached_tokens * self.cached_per_mtok
            + u.completion_tokens * self.completion_per_mtok
        ) / 1e6 + result.engine_seconds * self.per_engine_second


# Backend kind → price. Local: a 2-core machine at about $0.10 an hour.
DEFAULT_PRICES: dict[str, Price] = {
    "local": Price(per_engine_second=0.10 / 3600),
    "scripted": Price(per_engine_second=0.10 / 3600),
    "openai_http": Price(prompt_per_mtok=0.15, cached_per_mtok=0.075, completion_per_mtok=0.60),
}


class Meter:
    def __init__(self, store: Store, prices: dict[str, Price] | None = None) -> None:
        self.store = store
        self.prices = {**DEFAULT_PRICES, **(prices or {})}

    def price(self, kind: str, name: str) -> Price:
        """A price for the exact backend name first, then for its kind."""
        return self.prices.get(name) or self.prices.get(kind) or Price()

    def price_for(self, backend: Any, result: ChatResult) -> Price:
        """The price of the backend that answered: a pool's member (its own price, else the
        table's for its name or kind), another composite's member (by its name, or the kind its
        name starts with: "local:...", "openai_http:..."), or the backend itself."""
        if not result.backend or result.backend == backend.name:
            return self.price(backend.kind, backend.name)
        answered = result.backend
        lookup = getattr(backend, "member", None)
        member = lookup(answered) if callable(lookup) else None
        if member is None:
            return self.price(answered.partition(":")[0], answered)
        if member.price:
            return Price(**member.price)
        return self.price(member.kind, answered)

    def judge_steps(self, backend: Any, result: ChatResult) -> list[JudgeCall]:
        """A cascade's judge calls in `result`, each priced by the judge that answered."""
        steps = []
        for verdict in getattr(result, "judged", ()):
            u = verdict.usage
            steps.append(
                JudgeCall(
                    verdict.content,
                    u.prompt_tokens,
                    u.cached_tokens,
                    u.completion_tokens,
                    verdict.engine_seconds,
                    self.price_for(backend, verdict).cost(verdict),
                    verdict.backend,
                )
            )
        return steps

    def set_budget(
        self, user: str, max_tokens: int | None = None, max_cost: float | None = None
    ) -> None:
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO budgets VALUES (?, ?, ?)", (user, max_tokens, max_cost)
            )

    def user_totals(self, user: str) -> tuple[int, float]:
        row = self.store.one(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0),"
            " COALESCE(SUM(cost), 0) FROM usage WHERE user = ?",
            (user,),
        )
        assert row is not None
        return int(row[0]), float(row[1])

    def over_budget(self, user: str | None, usage: ProcessUsage, limits: Limits) -> str | None:
        """Why no more work may be done, or None."""
        if limits.max_tokens is not None and usage.total_tokens >= limits.max_tokens:
            return (
                f"token budget: the process used {usage.total_tokens} tokens of its "
                f"{limits.max_tokens}"
            )
        if limits.max_cost is not None and usage.cost >= limits.max_cost:
            return f"cost budget: the process spent ${usage.cost:.6f} of its ${limits.max_cost}"
        if user is None:
            return None
        budget = self.store.one("SELECT max_tokens, max_cost FROM budgets WHERE user = ?", (user,))
        if budget is None:
            return None
        tokens, cost = self.user_totals(user)
        if budget["max_tokens"] is not None and tokens >= budget["max_tokens"]:
            return f"user budget: {user} used {tokens} tokens of {budget['max_tokens']}"
        if budget["max_cost"] is not None and cost >= budget["max_cost"]:
            return f"user budget: {user} spent ${cost:.6f} of ${budget['max_cost']}"
        return None

    def summary(self, user: str | None = None, by: str = "user, model") -> list[dict[str, Any]]:
        """Totals grouped by `by` (columns of the usage table), optionally for one user."""
        assert by in ("user, model", "pid", "user", "model"), by
        where, args = ("WHERE user = ?", (user,)) if user is not None else ("", ())
        rows = self.store.query(
            f"SELECT {by}, COUNT(*) AS calls, SUM(prompt_tokens) AS prompt_tokens,"
            " SUM(cached_tokens) AS cached_tokens, SUM(completion_tokens) AS completion_tokens,"
            " SUM(engine_seconds) AS engine_seconds, SUM(cost) AS cost"
            f" FROM usage {where} GROUP BY {by} ORDER BY {by}",
            args,
        )
        return [dict(r) for r in rows]
