"""Soak: many streaming clients against one `llmos serve` for a long time, with the traffic a
public server gets (streams cut mid-way, bad requests, users, priorities, `n`, stop strings,
JSON schemas, tool calls), checking that nothing leaks.

Pass marks:
- 0 KV blocks held by no live request (`llmos_kv_blocks_orphaned`), on every scrape while the
  load runs and after it; after the load, with nothing in flight, used blocks == pinned blocks;
- the server's RSS grows under 5% from minute 5 (a third of the run, for runs under 15 minutes)
  to the end (runs under 5 minutes report it only);
- 0 responses >= 500, 0 error events in streams, every 4xx in OpenAI's error shape, and every
  bad request refused with a 4xx.

    .venv/bin/python benchmarks/soak.py --minutes 30 --clients 64 --plot soak.png --json soak.json

It starts its own `llmos serve` (or uses --url, in which case RSS is read from --pid, if given).
Exit status 0 when every pass mark holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

MODEL = "smollm2-135m"
TOPICS = (
    "the ocean",
    "a lighthouse",
    "bread",
    "the moon",
    "trains",
    "a small village",
    "honey bees",
    "volcanoes",
    "chess",
    "the river Thames",
)
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
# (route, body or raw bytes): each must be refused with a 4xx in OpenAI's shape
CHAT_OK = [{"role": "user", "content": "Hi"}]
BAD_REQUESTS: list[tuple[str, dict[str, Any] | bytes]] = [
    ("chat/completions", {"messages": []}),
    ("chat/completions", {"messages": CHAT_OK, "temperature": -1}),
    ("chat/completions", {"messages": "hi"}),
    ("chat/completions", {"model": "no-such-model", "messages": CHAT_OK}),
    ("chat/completions", {"messages": CHAT_OK, "n": 0}),
    ("chat/completions", {"messages": CHAT_OK, "response_format": {"type": "xml"}}),
    ("chat/completions", {"messages": CHAT_OK, "tools": [WEATHER_TOOL], "tool_choice": "x"}),
    ("chat/completions", {"messages": CHAT_OK, "logit_bias": {"1": 500}}),  # past 100
    ("chat/completions", {"messages": CHAT_OK, "max_tokens": -5, "stream": True}),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}'),
    ("completions", {"prompt": [1, 2**40], "echo": True}),
    ("completions", {"prompt": ""}),
    ("completions", {"prompt": "x", "stop_token_ids": [-1]}),
    ("completions", {"prompt": "x", "n": "many", "stream": True}),
]


@dataclass(slots=True)
class Result:
    started: float  # seconds since the load began
    kind: str  # stream, cut, bad
    status: int
    ttft: float | None = None
    chunks: int = 0
    error: str | None = None  # what broke a pass mark
    priority: int = 0


@dataclass(slots=True)
class Sample:
    t: float
    rss: int
    used: float
    pinned: float
    orphaned: float
    running: float
    waiting: float
    generated: float  # llmos_generation_tokens_total


@dataclass(slots=True)
class Soak:
    results: list[Result] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


# -- the server -------------------------------------------------------------------------------
def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable,
        "-c",
        "from llmos.cli.main import app; app()",
        "serve",
        "--port",
        "0",
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--kv-cache-memory",
        args.kv_cache_memory,
        "--max-waiting",
        "100000",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    banner = ""
    while "Ctrl+C" not in banner:
        line = lines.get(timeout=300)
        if line is None:
            raise SystemExit("llmos serve exited before it was ready")
        banner += line
    match = re.search(r"http://127\.0\.0\.1:\d+", banner)
    assert match is not None, banner
    return proc, match.group(0)


def rss_of(pid: int | None) -> int:
    if pid is None:
        return 0
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def scrape(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("llmos_") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


# -- the traffic ------------------------------------------------------------------------------
def good_request(rng: random.Random) -> tuple[str, dict[str, Any]]:
    common: dict[str, Any] = {
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": rng.randint(8, 48),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "seed": rng.randrange(1000),
        "user": f"user{rng.randrange(8)}",
        "priority": rng.choice([-1, 0, 0, 0, 1, 2]),
        "n": rng.choice([1, 1, 1, 2, 3]),
    }
    if rng.random() < 0.3:
        common["stop"] = rng.choice([".", ["\n\n", "!"], [" the "]])
    topic = rng.choice(TOPICS)
    if rng.random() < 0.25:
        return "completions", {**common, "prompt": f"A few facts about {topic}:"}
    body = {**common, "messages": [{"role": "user", "content": f"Tell me about {topic}."}]}
    shape = rng.random()
    if shape < 0.15:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        }
        body["messages"] = [{"role": "user", "content": f"A person who loves {topic}, as JSON."}]
        # room for the schema's shortest completion (a smaller budget is refused up front)
        body["max_tokens"] = rng.randint(40, 64)
    elif shape < 0.30:
        body["tools"] = [WEATHER_TOOL]
        body["tool_choice"] = rng.choice(["auto", "required"])
        body["messages"] = [{"role": "user", "content": "What is the weather in Paris?"}]
        body["max_tokens"] = rng.randint(40, 64)  # room for the shortest call
    return "chat/completions", body


def is_openai_error(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), dict)
        and set(body["error"]) == {"message", "type", "param", "code"}
    )


async def one_stream(
    http: httpx.AsyncClient, route: str, body: dict[str, Any], cut: int | None, t0: float
) -> Result:
    sent = time.monotonic()
    result = Result(sent - t0, "cut" if cut else "stream", 0, priority=body["priority"])
    async with http.stream("POST", f"/v1/{route}", json=body) as r:
        result.status = r.status_code
        if r.status_code != 200:
            raw = await r.aread()
            try:
                ok = is_openai_error(json.loads(raw))
            except ValueError:
                ok = False
            result.error = f"{r.status_code} {raw[:200]!r}" + ("" if ok else " (not OpenAI's)")
            return result
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = f"error event: {data[:200]}"
                return result
            if any(_has_output(c) for c in chunk.get("choices", [])):
                if result.ttft is None:
                    result.ttft = time.monotonic() - sent
                result.chunks += 1
                if cut is not None and result.chunks >= cut:
                    return result  # leaving the block closes the connection mid-stream
        if not done:
            result.error = "the stream ended without [DONE]"
    return result


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    if delta is not None:
        return bool(delta.get("content") or delta.get("tool_calls"))
    return bool(choice.get("text"))


async def one_bad(http: httpx.AsyncClient, rng: random.Random, t0: float) -> Result:
    route, body = rng.choice(BAD_REQUESTS)
    result = Result(time.monotonic() - t0, "bad", 0)
    if isinstance(body, bytes):
        r = await http.post(f"/v1/{route}", content=body)
    else:
        r = await http.post(f"/v1/{route}", json=body)
    result.status = r.status_code
    if not 400 <= r.status_code < 500:
        result.error = f"a bad request got {r.status_code}: {body!r:.200}"
    elif not is_openai_error(r.json()):
        result.error = f"not OpenAI's error shape: {r.text[:200]}"
    return result


async def client_loop(url: str, i: int, deadline: float, soak: Soak, t0: float) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < deadline:
            if rng.random() < 0.10:
                soak.results.append(await one_bad(http, rng, t0))
                continue
            route, body = good_request(rng)
            cut = rng.randint(1, 4) if rng.random() < 0.20 else None
            try:
                soak.results.append(await one_stream(http, route, body, cut, t0))
            except httpx.HTTPError as exc:
                soak.results.append(Result(time.monotonic() - t0, "stream", 0, error=repr(exc)))


async def monitor(url: str, pid: int | None, stop: asyncio.Event, soak: Soak, t0: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while True:
            m = await scrape(http)
            soak.samples.append(
                Sample(
                    time.monotonic() - t0,
                    rss_of(pid),
                    m["llmos_kv_blocks_used"],
                    m["llmos_kv_blocks_pinned"],
                    m.get("llmos_kv_blocks_orphaned", 0.0),
                    m["llmos_num_requests_running"],
                    m["llmos_num_requests_waiting"],
                    m.get("llmos_generation_tokens_total", 0.0),
                )
            )
            try:
                await asyncio.wait_for(stop.wait(), 5.0)
                return
            except TimeoutError:
                pass


async def settle(url: str, timeout: float = 120) -> dict[str, float]:
    """/metrics once nothing is in flight (cut streams are aborted between engine steps)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        deadline = time.monotonic() + timeout
        while True:
            m = await scrape(http)
            idle = m["llmos_num_requests_running"] == 0 and m["llmos_num_requests_waiting"] == 0
            if (idle and m["llmos_kv_blocks_used"] == m["llmos_kv_blocks_pinned"]) or (
                time.monotonic() > deadline
            ):
                return m
            await asyncio.sleep(0.5)


async def run(url: str, pid: int | None, seconds: float, clients: int) -> tuple[Soak, dict]:
    soak = Soak()
    t0 = time.monotonic()
    stop = asyncio.Event()
    watcher = asyncio.create_task(monitor(url, pid, stop, soak, t0))
    deadline = t0 + seconds
    await asyncio.gather(*(client_loop(url, i, deadline, soak, t0) for i in range(clients)))
    after = await settle(url)
    stop.set()
    await watcher
    soak.samples.append(
        Sample(
            time.monotonic() - t0,
            rss_of(pid),
            after["llmos_kv_blocks_used"],
            after["llmos_kv_blocks_pinned"],
            after.get("llmos_kv_blocks_orphaned", 0.0),
            after["llmos_num_requests_running"],
            after["llmos_num_requests_waiting"],
            after.get("llmos_generation_tokens_total", 0.0),
        )
    )
    return soak, after


# -- the report -------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def windows(soak: Soak, seconds: float, width: float) -> list[dict[str, Any]]:
    """Per window of `width` seconds: output tok/s (server-side), TTFT p50/p99, requests."""
    out = []
    samples = soak.samples
    start = 0.0
    while start < seconds - 1e-6:
        end = min(start + width, seconds)
        ttfts = [r.ttft for r in soak.results if r.ttft is not None and start <= r.started < end]
        inside = [s for s in samples if start <= s.t <= end + 2.5]
        tok_s = None
        if len(inside) >= 2:
            tok_s = (inside[-1].generated - inside[0].generated) / (inside[-1].t - inside[0].t)
        out.append(
            {
                "minute": end / 60,
                "tok_s": tok_s,
                "ttft_p50": pct(ttfts, 0.5),
                "ttft_p99": pct(ttfts, 0.99),
                "requests": sum(start <= r.started < end for r in soak.results),
                "rss_mib": (inside[-1].rss / 2**20) if inside else None,
            }
        )
        start = end
    return out


def summarize(soak: Soak, after: dict[str, float], seconds: float) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for r in soak.results:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    errors = [r.error for r in soak.results if r.error]
    during = soak.samples[:-1]
    rss_from_t = min(300.0, seconds / 3)
    rss_base = next((s.rss for s in soak.samples if s.t >= rss_from_t), 0)
    rss_end = soak.samples[-1].rss
    growth = (rss_end - rss_base) / rss_base if rss_base else None
    ttfts = [r.ttft for r in soak.results if r.ttft is not None]
    generated = soak.samples[-1].generated - soak.samples[0].generated
    by_priority = {}
    for prio in sorted({r.priority for r in soak.results if r.kind != "bad"}):
        times = [r.ttft for r in soak.results if r.ttft is not None and r.priority == prio]
        by_priority[str(prio)] = {"n": len(times), "p50": pct(times, 0.5), "p99": pct(times, 0.99)}
    marks = {
        "no 5xx": all(r.status < 500 for r in soak.results),
        "no request errors": not errors,
        "no orphaned KV blocks while running": all(s.orphaned == 0 for s in during),
        "no orphaned KV blocks after": after.get("llmos_kv_blocks_orphaned", 0) == 0,
        "after: used == pinned, nothing in flight": (
            after["llmos_kv_blocks_used"] == after["llmos_kv_blocks_pinned"]
            and after["llmos_num_requests_running"] == 0
            and after["llmos_num_requests_waiting"] == 0
        ),
    }
    if seconds >= 300:  # a shorter run measures warm-up, not growth
        marks["RSS growth < 5%"] = growth is not None and growth < 0.05
    return {
        "seconds": seconds,
        "requests": len(soak.results),
        "by_kind": {k: sum(r.kind == k for r in soak.results) for k in ("stream", "cut", "bad")},
        "by_status": by_status,
        "errors": errors[:20],
        "num_errors": len(errors),
        "output_tokens": generated,
        "tok_s": generated / seconds,
        "ttft_p50": pct(ttfts, 0.5),
        "ttft_p99": pct(ttfts, 0.99),
        "ttft_by_priority": by_priority,
        "load_average_end": os.getloadavg()[0],
        "rss_from_s": rss_from_t,
        "rss_base_mib": rss_base / 2**20,
        "rss_end_mib": rss_end / 2**20,
        "rss_growth": growth,
        "max_orphaned_while_running": max((s.orphaned for s in during), default=0),
        "max_kv_used_while_running": max((s.used for s in during), default=0),
        "after": {k: after[k] for k in sorted(after) if k.startswith("llmos_kv_blocks")},
        "marks": marks,
        "passed": all(marks.values()),
    }


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = [
        "| minute | output tok/s | TTFT p50 (s) | TTFT p99 (s) | requests | server RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for w in rows:
        lines.append(
            f"| {w['minute']:.1f} | {f(w['tok_s'], '.1f')} | {f(w['ttft_p50'], '.2f')} | "
            f"{f(w['ttft_p99'], '.2f')} | {w['requests']} | {f(w['rss_mib'], ',.0f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [w["minute"] for w in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(minutes, [w["tok_s"] for w in rows], marker="o")
    top.set_ylabel("output tok/s")
    top.set_title(title)
    top.grid(alpha=0.3)
    bottom.plot(minutes, [w["ttft_p50"] for w in rows], marker="o", label="TTFT p50")
    bottom.plot(minutes, [w["ttft_p99"] for w in rows], marker="o", label="TTFT p99")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("minute")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--window", type=float, default=60.0, help="seconds per table row")
    p.add_argument("--plot", help="write the throughput/TTFT plot here (PNG)")
    p.add_argument("--json", help="write the summary and the windows here")
    args = p.parse_args(argv)
    seconds = args.minutes * 60
    proc = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args)
        pid = proc.pid
    try:
        soak, after = asyncio.run(run(url, pid, seconds, args.clients))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = summarize(soak, after, seconds)
    rows = windows(soak, seconds, args.window)
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}, indent=1))
    for e in summary["errors"]:
        print("error:", e)
    print(table(rows))
    if args.plot:
        plot(rows, args.plot, f"soak: {args.clients} streaming clients, {args.minutes:g} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"summary": summary, "windows": rows, "samples": [asdict(s) for s in soak.samples]},
                f,
                indent=1,
            )
    print(
        "PASS"
        if summary["passed"]
        else "FAIL: " + ", ".join(k for k, v in summary["marks"].items() if not v)
    )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
