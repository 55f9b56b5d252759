"""Serving when the cores are shared: `llmos serve` alone, and beside CPU-bound jobs.

    .venv/bin/python benchmarks/contention.py [--duration 20] [--clients 8] [--hogs 1,2]
                                              [--record BENCHMARKS.md]

For each OpenMP wait policy, one server process; C clients send streaming `/v1/completions`
requests of 48 tokens (EOS suppressed) back to back, first alone and then with H busy processes
beside it (each a single-threaded spin loop, as another job on the machine would be). Reported:
output tokens/s, p50 request latency and TTFT, and throughput as a share of the same server
alone. The policies:

- `OpenMP default`: what `llmos serve` ran with before llmos set a policy (torch is imported
  before llmos, so llmos cannot set one; OMP_WAIT_POLICY unset: libgomp spins, then sleeps);
- `PASSIVE`: idle workers sleep at once (what llmos set before it bounded the spin);
- `GOMP_SPINCOUNT=N`: workers spin about N pause loops, then sleep; `llmos default` is what
  every llmos entry point runs with when the user set neither variable (llmos/__init__.py).

`--policies` picks some of them by name (comma-separated; default: all).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, replace_section  # noqa: E402
from serve import Level, free_port, machine_line, run_level, server_process  # noqa: E402

SERVE = "from llmos.cli.main import app; app()"
UNSET = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
POLICIES = {
    # torch first: its OpenMP runtime reads the (unset) policy before llmos could set one
    "OpenMP default": ("import torch; " + SERVE, UNSET),
    "PASSIVE": (SERVE, {**UNSET, "OMP_WAIT_POLICY": "PASSIVE"}),
    "GOMP_SPINCOUNT=100000": (SERVE, {**UNSET, "GOMP_SPINCOUNT": "100000"}),
    "llmos default": (SERVE, UNSET),
}
HOG = "while True: pass"


@dataclass(slots=True)
class Result:
    policy: str
    hogs: int
    level: Level

    @property
    def latency_p50(self) -> float:
        done = [r.stamps[-1] - r.sent for r in self.level.requests if r.stamps]
        return statistics.median(done) if done else float("nan")


def _env(overrides: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _measure(url: str, policy: str, clients: int, duration: float, hogs: int, seed: int) -> Result:
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        time.sleep(0.5 if hogs else 0)
        extra = {"ignore_eos": True, "max_tokens": 48}
        level = asyncio.run(run_level(url, policy, clients, duration, False, extra, seed=seed))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return Result(policy, hogs, level)


def main(
    duration: Annotated[float, typer.Option(help="Seconds per measurement.")] = 20.0,
    clients: Annotated[int, typer.Option(help="Concurrent streaming clients.")] = 8,
    hogs: Annotated[str, typer.Option(help="Comma-separated counts of busy processes.")] = "1,2",
    policies: Annotated[
        str | None, typer.Option(help="Comma-separated policy names (default: all).")
    ] = None,
    record: Annotated[
        Path | None, typer.Option(help="Write the results section here (replacing it).")
    ] = None,
) -> None:
    counts = [0, *(int(h) for h in hogs.split(","))]
    results: list[Result] = []
    chosen = policies.split(",") if policies else list(POLICIES)
    unknown = [name for name in chosen if name not in POLICIES]
    if unknown:
        raise typer.BadParameter(
            f"unknown {unknown}; choose from {list(POLICIES)}", param_hint="--policies"
        )
    for policy in chosen:
        code, overrides = POLICIES[policy]
        port = free_port()
        args = [sys.executable, "-c", code, "serve", "--port", str(port), "--grace", "1"]
        with server_process(args, port, _env(overrides)) as url:
            asyncio.run(run_level(url, policy, 2, 3.0, False, {"max_tokens": 8}, seed=99))
            for n, h in enumerate(counts):
                r = _measure(url, policy, clients, duration, h, seed=n + 10 * len(results))
                results.append(r)
                print(
                    f"{policy:26} hogs={h}  {r.level.tokens_per_s:7.1f} tok/s  "
                    f"latency p50 {r.latency_p50:6.2f} s",
                    flush=True,
                )
    alone = {r.policy: r.level.tokens_per_s for r in results if r.hogs == 0}
    rows = [
        [
            r.policy,
            str(r.hogs),
            f"{r.level.tokens_per_s:.1f}",
            f"{r.latency_p50:.2f}",
            f"{r.level.ttft(50)[0]:.2f}",
            f"{r.level.tokens_per_s / max(alone[r.policy], 1e-9):.0%}",
            str(r.level.errors),
        ]
        for r in results
    ]
    head = [
        "OpenMP wait policy",
        "busy processes",
        "output tok/s",
        "request latency p50 (s)",
        "TTFT p50 (s)",
        "share of alone",
        "errors",
    ]
    table = md_table(head, rows)
    print(table)
    if record is not None:
        body = (
            f"`benchmarks/contention.py --duration {duration:g} --clients {clients} --hogs "
            f"{hogs}` on {machine_line()}. Streaming /v1/completions, 48 tokens each (EOS "
            "suppressed), temperature 1; busy processes are single-threaded spin loops "
            "started beside the server.\n\n" + table
        )
        replace_section(record, "## Shared cores (benchmarks/contention.py)", body)


if __name__ == "__main__":
    typer.run(main)
