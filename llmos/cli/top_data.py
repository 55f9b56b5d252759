"""What `llmos top` shows, read once a refresh: the processes from the kernel DB (read-only, so
a top never blocks a run) and, given a server's URL, its engine from `/metrics`, with rates over
the last refresh (tok/s, TTFT, ITL, prefix-cache hits). vLLM's metric names are read, so the
engine panel works on a vLLM server too."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROCESS_SQL = """SELECT p.pid, p.program_name, p.owner, p.status, p.input, p.created_at,
    (SELECT COUNT(*) FROM steps s WHERE s.pid = p.pid) AS steps,
    (SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage u
     WHERE u.pid = p.pid) AS tokens,
    (SELECT COALESCE(SUM(cost), 0) FROM usage u WHERE u.pid = p.pid) AS cost
    FROM processes p ORDER BY p.pid"""
FINISHED = ("done", "failed", "killed")


@dataclass(slots=True)
class Proc:
    pid: int
    program: str
    user: str
    state: str
    steps: int
    tokens: int
    cost: float
    input: str
    kv_blocks: int | None = None  # pinned for it in the engine (known with --url)


def read_processes(db: str | Path) -> list[Proc]:
    if not Path(db).exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = con.execute(PROCESS_SQL).fetchall()
    except sqlite3.OperationalError:  # a DB no kernel has used yet
        return []
    finally:
        con.close()
    return [
        Proc(pid, program, owner or "-", status, steps, tokens, cost, " ".join(text.split()))
        for pid, program, owner, status, text, _created, steps, tokens, cost in rows
    ]


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str, timeout: float = 2.0) -> Samples:
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: Samples, name: str) -> float | None:
    rows = samples.get(name)
    return None if not rows else sum(v for _, v in rows)


@dataclass(slots=True)
class Engine:
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # 0..1
    hit_rate: float | None = None  # of prompt tokens looked up, found cached (last refresh)
    hit_rate_all: float | None = None  # since the server started
    tok_s: float | None = None
    ttft: float | None = None  # seconds, mean over the last refresh (else since start)
    itl: float | None = None
    pins: dict[int, int] = field(default_factory=dict)  # pid -> KV blocks pinned
    error: str | None = None


class EngineWatch:
    """Rates need two scrapes: each refresh compares with the one before."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._last: tuple[float, Samples] | None = None

    def read(self) -> Engine:
        try:
            now, samples = time.monotonic(), scrape(self.url)
        except (httpx.HTTPError, ValueError) as exc:
            return Engine(error=f"{self.url}: {type(exc).__name__}: {exc}")
        e = Engine(
            running=total(samples, "vllm:num_requests_running"),
            waiting=total(samples, "vllm:num_requests_waiting"),
            kv_usage=total(samples, "vllm:kv_cache_usage_perc"),
        )
        queries = total(samples, "vllm:prefix_cache_queries_total")
        hits = total(samples, "vllm:prefix_cache_hits_total")
        if queries and hits is not None:
            e.hit_rate_all = e.hit_rate = hits / queries
        for labels, value in samples.get("llmos_kernel_kv_blocks_pinned", []):
            if labels.get("pid", "").isdigit():
                e.pins[int(labels["pid"])] = int(value)
        e.ttft = _mean(samples, "vllm:time_to_first_token_seconds")
        e.itl = _mean(samples, "vllm:inter_token_latency_seconds")
        if self._last is not None:
            then, before = self._last
            dt = max(1e-6, now - then)
            gen = _delta(samples, before, "vllm:generation_tokens_total")
            e.tok_s = None if gen is None else gen / dt
            dq = _delta(samples, before, "vllm:prefix_cache_queries_total")
            dh = _delta(samples, before, "vllm:prefix_cache_hits_total")
            if dq and dh is not None:
                e.hit_rate = dh / dq
            e.ttft = _mean(samples, "vllm:time_to_first_token_seconds", before) or e.ttft
            e.itl = _mean(samples, "vllm:inter_token_latency_seconds", before) or e.itl
        self._last = (now, samples)
        return e


def _delta(now: Samples, before: Samples, name: str) -> float | None:
    a, b = total(now, name), total(before, name)
    return None if a is None else a - (b or 0.0)


def _mean(now: Samples, name: str, before: Samples | None = None) -> float | None:
    """A histogram's mean, since the start or (given `before`) since that scrape."""
    s, c = total(now, f"{name}_sum"), total(now, f"{name}_count")
    if before is not None and s is not None and c is not None:
        s, c = s - (total(before, f"{name}_sum") or 0), c - (total(before, f"{name}_count") or 0)
    return None if not c or s is None else s / c
