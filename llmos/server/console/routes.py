"""The console's routes: the page and its files, the engine's stats (one snapshot, or samples
over SSE), and eval reports when the server was given a way to render them.

Engine numbers come only from the snapshot the engine thread publishes after each step
(`AsyncEngine.stats()`); nothing here touches live engine state. Throughput counts the tokens
of HTTP requests (the server's own counter) and of processes (the kernel's usage rows).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)

from llmos.server.errors import APIError
from llmos.server.processes_host import ProcessHost
from llmos.server.state import ServerState
from llmos.server.streaming import event

_FILES = {
    "console.js": "text/javascript",
    "panels.js": "text/javascript",
    "console.css": "text/css",
}
_NO_CACHE = {"Cache-Control": "no-cache"}


class EvalReports(Protocol):
    """What `llmos serve` hands the console for the eval history (the server cannot import
    llmos.evals: see ARCHITECTURE.md's layers)."""

    def runs(self) -> list[dict[str, Any]]: ...  # newest first: run_id, suite, started_at, passed

    def html(self, run_id: str) -> str | None: ...  # the report, as `llmos eval --html` writes it


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@dataclass(slots=True)
class Sampler:
    """Engine samples for one client: the snapshot plus rates since the previous sample."""

    state: ServerState
    kernel: ProcessHost | None
    _last: tuple[float, float, int, int, int] | None = field(default=None)
    _rate: float = 0.0

    def generated_tokens(self) -> int:
        http = self.state.metrics.registry.get_sample_value("llmos_generation_tokens_total") or 0
        kernel = 0
        if self.kernel is not None:
            row = self.kernel.kernel.store.one("SELECT SUM(completion_tokens) FROM usage")
            kernel = int(row[0] or 0) if row is not None else 0
        return int(http) + kernel

    def sample(self) -> dict[str, Any]:
        s = self.state.engine.stats()
        now, tokens = time.monotonic(), self.generated_tokens()
        out: dict[str, Any] = {"time": time.time(), **s.as_dict(), "generated_tokens": tokens}
        out["kv_usage"] = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        out["tokens_per_second"] = out["steps_per_second"] = 0.0
        out["prefix_cache_hit_rate"] = (
            s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        )
        if self._last is not None:
            t0, _, tok0, queries0, hits0 = self._last
            dt = max(now - t0, 1e-6)
            out["tokens_per_second"] = max(tokens - tok0, 0) / dt
            out["steps_per_second"] = max(s.num_steps - self._last[1], 0) / dt
            queries = s.prefix_cache_queries - queries0
            # the hit rate of the prompts that arrived since the last sample (none: as it was)
            out["prefix_cache_hit_rate"] = (
                (s.prefix_cache_hits - hits0) / queries if queries > 0 else self._rate
            )
        self._rate = out["prefix_cache_hit_rate"]
        self._last = (now, s.num_steps, tokens, s.prefix_cache_queries, s.prefix_cache_hits)
        return out


def install(app: FastAPI, state: ServerState, kernel: ProcessHost | None) -> None:
    def page() -> HTMLResponse:
        html = _read("index.html").replace("{{MODEL}}", state.model_name)
        return HTMLResponse(html, headers=_NO_CACHE)

    @app.get("/", include_in_schema=False)
    async def root() -> HTMLResponse:
        return page()

    @app.get("/console", include_in_schema=False)
    async def console_page() -> HTMLResponse:
        return page()

    @app.get("/console/{name}", include_in_schema=False)
    async def console_file(name: str) -> Response:
        if name not in _FILES:
            raise APIError(404, f"no console file {name!r}", code="not_found")
        return Response(_read(name), media_type=_FILES[name], headers=_NO_CACHE)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/v1/engine/stats", include_in_schema=False)
    async def engine_stats() -> JSONResponse:
        return JSONResponse({"object": "engine.stats", **Sampler(state, kernel).sample()})

    # A stream without end (until the client leaves): out of the OpenAPI document, which
    # describes requests that finish.
    @app.get("/v1/engine/stats/events", include_in_schema=False)
    async def engine_stats_events(
        interval: Annotated[
            float, Query(ge=0.1, le=10.0, description="Seconds between samples.")
        ] = 0.5,
    ) -> StreamingResponse:
        return StreamingResponse(
            samples(Sampler(state, kernel), interval, lambda: state.draining),
            media_type="text/event-stream",
            headers={**_NO_CACHE, "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/console/info", include_in_schema=False)
    async def info(request: Request) -> JSONResponse:
        user = getattr(request.state, "llmos_user", None)
        return JSONResponse(
            {
                "model": state.model_name,
                "max_model_len": state.max_model_len,
                "kernel": kernel is not None,
                "programs": sorted(kernel.programs) if kernel is not None else [],
                "user": getattr(user, "name", None),
                "admin": bool(getattr(user, "admin", kernel is None)),
                "evals": _evals(app) is not None,
            }
        )

    @app.get("/v1/console/evals", include_in_schema=False)
    async def eval_runs() -> JSONResponse:
        reports = _evals(app)
        runs = await asyncio.to_thread(reports.runs) if reports is not None else []
        return JSONResponse({"object": "list", "data": runs})

    # the report's own HTML, which the page shows in a sandboxed frame
    @app.get("/v1/console/evals/{run_id}", include_in_schema=False)
    async def eval_report(run_id: str) -> HTMLResponse:
        reports = _evals(app)
        html = await asyncio.to_thread(reports.html, run_id) if reports is not None else None
        if html is None:
            raise APIError(404, f"no eval run {run_id!r}", param="run_id", code="not_found")
        return HTMLResponse(html)


def _evals(app: FastAPI) -> EvalReports | None:
    """Set by `llmos serve` (app.state.eval_reports) when it can read the eval history."""
    return getattr(app.state, "eval_reports", None)


async def samples(
    sampler: Sampler, interval: float, draining: Callable[[], bool]
) -> AsyncIterator[str]:
    while not draining():
        yield event(sampler.sample())
        await asyncio.sleep(interval)
    yield APIError(503, "the server is shutting down", code="shutting_down").sse()
