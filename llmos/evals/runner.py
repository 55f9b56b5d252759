"""Run a suite: every cell of its matrix, every case, `repeat` fresh samples each.

Cells are grouped by the engine they need (model and engine flags); a group's cases are all
in flight at once on its engine, so continuous batching runs them together; the engine is let
go before the next group loads. The result is the report's JSON shape (see report.py)."""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmos.evals import assertions, choices, providers
from llmos.evals.suite import Case, Cell, Suite, SuiteError

Job = tuple[Cell, Case, int]


def wilson(passed: int, total: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a pass rate."""
    if total == 0:
        return [0.0, 1.0]
    p = passed / total
    denom = 1 + z * z / total
    mid = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return [max(0.0, mid - half), min(1.0, mid + half)]


def pass_hat_k(c: int, n: int, k: int) -> float:
    """pass^k: the chance that k samples drawn from the n all pass (C(c,k) / C(n,k))."""
    return math.comb(c, k) / math.comb(n, k) if n >= k else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _run_group(cells: list[Cell], suite: Suite, repeat: int, engines: providers.Engines,
                     root: Path) -> list[tuple[Job, providers.Output]]:  # fmt: skip
    backend = engines.for_cell(cells[0])
    kernel = None
    if any(c.kind == "program" for c in cells):
        from llmos import Kernel

        for c in cells:  # a program file that does not load is a configuration error
            if c.kind == "program":
                providers.load_program(c)
        kernel = Kernel(backend=providers.Shared(backend), db=root / "kernel.db")
    jobs: list[Job] = [(c, t, r) for r in range(repeat) for c in cells for t in suite.cases]
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=max(8, len(jobs) + 4)))

    async def one(job: Job) -> providers.Output:
        cell, case, r = job
        try:
            if case.choices is not None:
                context = providers.prompt_text(cell, case)
                return await choices.run_choices(backend, cell, case, context)
            if cell.kind == "program":
                return await providers.run_program(kernel, cell, case, r, root)
            if cell.mode == "completion":
                if cell.kind != "local":
                    raise SuiteError(f"{cell.provider}: completion mode needs a local provider")
                return await providers.run_completion(backend, cell, case, r)
            return await providers.run_chat(backend, cell, case, r)
        except SuiteError:
            raise
        except Exception as exc:  # noqa: BLE001 - a refused request fails its case, not the run
            return providers.Output(status="error", error=f"{type(exc).__name__}: {exc}")

    try:
        outputs = await asyncio.gather(*(one(j) for j in jobs))
    finally:
        if kernel is not None:
            await asyncio.to_thread(kernel.close)
    return list(zip(jobs, outputs, strict=True))


async def _grade(
    job: Job, out: providers.Output, suite: Suite, engines: providers.Engines
) -> dict[str, Any]:  # noqa: E501
    cell, case, r = job
    ctx = assertions.Context({**case.vars, "output": out.text}, suite.base, engines.judge)
    results = [await assertions.grade(a, out, ctx) for a in case.asserts]
    passed, score = assertions.verdict(results, case.threshold)
    return {
        "cell": cell.id, "test": case.id, "description": case.description, "repeat": r,
        "passed": passed, "score": score, "output": out.text, "latency_s": out.latency_s,
        "tokens": out.tokens, "cost": out.cost, "assertions": results,
        "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
        "steps": out.steps, "status": out.status, "error": out.error,
        "tool_calls": out.tool_calls,
        "transcript": out.transcript,  # a program's steps; each choice's log-likelihood
    }  # fmt: skip


def _cell_summary(cell: Cell, cases: list[dict[str, Any]], repeat: int) -> dict[str, Any]:
    mine = [c for c in cases if c["cell"] == cell.id]
    passed = sum(c["passed"] for c in mine)
    by_test: dict[str, list[bool]] = {}
    texts: dict[str, set[str]] = {}
    for c in mine:
        by_test.setdefault(c["test"], []).append(c["passed"])
        texts.setdefault(c["test"], set()).add(c["output"])
    pass_k = (
        sum(pass_hat_k(sum(v), len(v), repeat) for v in by_test.values()) / max(1, len(by_test))
        if repeat > 1
        else None
    )
    # pass^k's own 95% interval: over tests, each passing all k repeats or not
    all_k = sum(all(v) for v in by_test.values())
    pass_k_wilson = wilson(all_k, len(by_test)) if repeat > 1 else None
    lat = [c["latency_s"] for c in mine]
    return {
        "id": cell.id, "label": cell.label, "provider": cell.provider, "config": cell.config,
        "engine": {**providers.EVAL_ENGINE, **cell.engine} if cell.kind != "openai_http" else {},
        "passed": passed, "total": len(mine), "pass_rate": passed / max(1, len(mine)),
        "pass_k": pass_k, "k": repeat, "pass_k_wilson": pass_k_wilson,
        "wilson": wilson(passed, len(mine)),
        "prompt_tokens": sum(c["prompt_tokens"] for c in mine),
        "completion_tokens": sum(c["completion_tokens"] for c in mine),
        "cost": sum(c["cost"] for c in mine),
        "latency_p50": percentile(lat, 0.5), "latency_p95": percentile(lat, 0.95),
        # across repeats: tests whose verdict flipped, and tests whose text changed at all
        "flaky_tests": sum(len(set(v)) > 1 for v in by_test.values()),
        "varied_outputs": sum(len(v) > 1 for v in texts.values()),
        "model_hash": providers.model_hash(cell.model) if cell.kind != "openai_http" else None,
    }  # fmt: skip


def run_suite(suite: Suite, repeat: int = 1, progress: Any = None, seed: int = 0) -> dict[str, Any]:
    """Every cell × case × repeat; returns the result JSON (without gates and baseline)."""
    if repeat < 1:
        raise SuiteError(f"--repeat must be at least 1, got {repeat}")
    started, t0 = time.time(), time.perf_counter()
    groups: dict[tuple[str, ...], list[Cell]] = {}
    for cell in suite.cells:
        key = (
            ("http", cell.model, cell.url or "")
            if cell.kind == "openai_http"
            else ("local", *cell.engine_key)
        )  # noqa: E501
        groups.setdefault(key, []).append(cell)

    engines = providers.Engines(seed)

    async def main() -> list[dict[str, Any]]:
        graded: list[dict[str, Any]] = []
        try:
            with tempfile.TemporaryDirectory(prefix="llmos-eval-") as tmp:
                for i, cells in enumerate(groups.values()):
                    g0 = time.perf_counter()
                    done = await _run_group(cells, suite, repeat, engines, Path(tmp) / f"g{i}")
                    for job, out in done:
                        graded.append(await _grade(job, out, suite, engines))
                    await engines.close(keep=engines.judges)
                    if progress is not None:
                        names = ", ".join(c.label for c in cells)
                        took = time.perf_counter() - g0
                        progress(f"{names}: {len(done)} cases in {took:.1f} s")
        finally:
            await engines.close()
        return graded

    cases = asyncio.run(main())
    order = {c.id: i for i, c in enumerate(suite.cells)}
    cases.sort(key=lambda c: (order[c["cell"]], c["repeat"]))
    return {
        "run_id": uuid.uuid4().hex[:12],
        "suite": {"name": suite.name, "path": suite.path, "hash": suite.hash},
        "started_at": started,
        "duration_s": time.perf_counter() - t0,
        "repeat": repeat,
        "seed": seed,
        "cells": [_cell_summary(c, cases, repeat) for c in suite.cells],
        "cases": cases,
        "gates": [],
        "baseline": None,
        "engines": engines.closed,  # KV blocks still held when each engine was let go: 0
    }
