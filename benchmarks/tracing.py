"""What tracing costs: `llmos serve` throughput at 16 clients with tracing off vs on.

    .venv/bin/python benchmarks/tracing.py [--duration 15] [--rounds 6] [--clients 16]
                                           [--record BENCHMARKS.md]

One server app (the real model) runs in this process; tracing is switched off (no provider:
the no-op tracer) and on (every request's span exported over OTLP/HTTP to a collector stand-in
in this process, which counts the export requests and bytes). Each round runs off, on and off
again (the next round in the reverse order), so one process, one engine and one cache state
serve both modes, and the "on" run sits between two "off" runs: a drift of the machine's speed
cancels, and the two "off" runs against each other give this run's noise floor. Each run,
`--clients` clients (in a process of their own) send streaming /v1/completions back to back for
`--duration` seconds (64 output tokens each, EOS suppressed). Reported: output tok/s per run,
the median over rounds of on / mean(off, off), the same for the two offs (the noise), the
server's CPU per output token, and the tracing path's own CPU per request, measured alone; the
floor is a cost of at most 2%.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated

import httpx
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cpu_stall_us,
    loadavg,
    md_table,
    replace_section,
    stall_share,
)

MODEL = "smollm2-135m"
HEADING = "## Tracing (benchmarks/tracing.py)"


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP endpoint that accepts and counts span exports."""

    exports = 0
    bytes = 0


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        server: Collector = self.server  # type: ignore[assignment]
        server.exports += 1
        server.bytes += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, clients: int, duration: float) -> int:
    """Output tokens received inside the window."""
    tokens = 0
    deadline = time.monotonic() + duration

    async def client_loop(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        n = 0
        while time.monotonic() < deadline:
            body = {
                "model": MODEL,
                "prompt": f"Client {i} story {n}: once upon a time",
                "max_tokens": 64,
                "temperature": 1.0,
                "ignore_eos": True,
                "stream": True,
            }
            n += 1
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if time.monotonic() >= deadline:
                        return
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        tokens += sum(1 for c in chunk["choices"] if c.get("text"))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as h:
        tasks = [asyncio.create_task(client_loop(i, h)) for i in range(clients)]
        await asyncio.wait(tasks, timeout=duration + 30)
        for t in tasks:
            t.cancel()
    return tokens


def span_cost_us(otlp: str, n: int = 1500) -> dict[str, float]:
    """CPU µs per request of the server's tracing path (the middleware, the request span, its
    attributes, the trace id header, the batch exporter), off and on, in this process."""
    from llmos.kernel import trace
    from llmos.server import tracing

    async def app(scope: dict, receive: object, send: object) -> None:
        span = tracing.current()
        assert span is not None
        span.add("cmpl-1", 20, 8, 64, ["length"], 0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    middleware = tracing.TracingMiddleware(app, model_name=lambda: MODEL)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(b"content-type", b"application/json")],
        "server": ("127.0.0.1", 8000),
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        pass

    async def run() -> float:
        t0 = time.process_time()
        for _ in range(n):
            await middleware(scope, receive, send)
        return (time.process_time() - t0) / n * 1e6

    costs = {}
    for mode in ("off", "on"):
        if mode == "on":
            trace.configure(endpoint=otlp)
        runs = []
        for _ in range(3):
            runs.append(asyncio.run(run()))
            trace.flush()  # (the batch queue holds 2048 spans)
        costs[mode] = min(runs)
    trace.shutdown()  # flushes the batch
    return costs


def client_main(url: str, clients: int, duration: float) -> None:
    """The load, in a process of its own (so it never shares the server's GIL)."""
    print(asyncio.run(load(url, clients, duration)), flush=True)


def run_load(url: str, clients: int, duration: float) -> int:
    cmd = [sys.executable, __file__, "--client-of", url, "--clients", str(clients)]
    out = subprocess.run(
        [*cmd, "--duration", str(duration)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def main(
    duration: Annotated[float, typer.Option(help="Seconds per round.")] = 15.0,
    rounds: Annotated[int, typer.Option(help="Rounds per mode (they alternate).")] = 6,
    clients: Annotated[int, typer.Option(help="Concurrent streaming clients.")] = 16,
    record: Annotated[Path | None, typer.Option(help="Write the section here.")] = None,
    client_of: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    if client_of is not None:
        client_main(client_of, clients, duration)
        return
    from llmos import LLM
    from llmos.engine.async_engine import AsyncEngine
    from llmos.kernel import trace
    from llmos.server.app import create_app
    from llmos.server.launch import serve_in_thread

    collector = Collector(("127.0.0.1", 0), _Handler)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    otlp = f"http://127.0.0.1:{collector.server_address[1]}"
    modes = ("off", "on", "off2")  # off2: the same as off; "on" runs between the two
    tok_s: dict[str, list[float]] = {m: [] for m in modes}
    cpu_ms: dict[str, list[float]] = {m: [] for m in modes}  # server CPU ms per output token
    me = os.getpid()
    with serve_in_thread(create_app(AsyncEngine(LLM(model=MODEL).engine))) as server:
        run_load(server.url, clients, 3.0)  # warm-up
        stall0, t0, load0 = cpu_stall_us(), time.monotonic(), loadavg()
        for r in range(rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                if mode == "on":
                    trace.configure(endpoint=otlp)
                cpu0 = cpu_of(me)
                n = run_load(server.url, clients, duration)
                tok_s[mode].append(n / duration)
                cpu_ms[mode].append(1000 * (cpu_of(me) - cpu0) / max(1, n))
                trace.shutdown()  # tracing off again (its last spans exported)
                print(
                    f"round {r + 1} tracing {mode}: {n / duration:.1f} tok/s, "
                    f"{cpu_ms[mode][-1]:.2f} server CPU ms/token",
                    flush=True,
                )
        stall = stall_share(stall0, time.monotonic() - t0)
        exports, sent = collector.exports, collector.bytes
    per_request = span_cost_us(otlp)
    collector.shutdown()
    offs = {
        key: [(a + b) / 2 for a, b in zip(series["off"], series["off2"], strict=True)]
        for key, series in (("tok", tok_s), ("cpu", cpu_ms))
    }
    pairs = [on / off for on, off in zip(tok_s["on"], offs["tok"], strict=True)]
    noise = [b / a for a, b in zip(tok_s["off"], tok_s["off2"], strict=True)]
    ratio = statistics.median(pairs)
    cpu_ratio = statistics.median(
        on / off for on, off in zip(cpu_ms["on"], offs["cpu"], strict=True)
    )
    label = {"off": "off (1)", "on": "on", "off2": "off (2)"}
    rows = [
        [
            label[mode],
            " / ".join(f"{v:.1f}" for v in tok_s[mode]),
            f"{statistics.median(tok_s[mode]):.1f}",
            f"{statistics.median(cpu_ms[mode]):.2f}",
        ]
        for mode in modes
    ]
    verdict = "pass" if ratio >= 0.98 else "fail"
    request_cpu_us = statistics.median(cpu_ms["off"]) * 64 * 1000  # a 64-token request
    extra = per_request["on"] - per_request["off"]
    body = "\n".join(
        [
            f"`.venv/bin/python benchmarks/tracing.py --duration {duration:g} --rounds {rounds} "
            f"--clients {clients}`: one in-process `llmos serve` app (the real model), tracing "
            "switched off (the no-op tracer) and on (every request's span exported over "
            "OTLP/HTTP to a local collector stand-in: "
            f"{exports} export requests, {sent / 1e3:.0f} kB); each round runs off, on, off "
            "(the next round in reverse), and each run has "
            f"{clients} streaming /v1/completions clients (in their own process) send 64-token "
            "requests (EOS suppressed) back to back. Load average "
            f"{load0:.1f} at the start; CPU stall {stall or float('nan'):.2f} (the share of "
            "the time some task waited for a core); the ratios are medians over rounds of on / "
            "the mean of the round's two offs, so a steady drift cancels.",
            "",
            md_table(
                ["tracing", "output tok/s per round", "median tok/s", "server CPU ms / token"],
                rows,
            ),
            "",
            f"The tracing path alone, in-process (`span_cost_us`, CPU time, min of 3 × 1500): "
            f"{per_request['off']:.0f} µs per request off (the middleware and no-op tracer), "
            f"{per_request['on']:.0f} µs on (the SDK span, its attributes, the trace id header, "
            f"the batch exporter): **{extra:.0f} µs** more per request, against "
            f"{request_cpu_us / 1000:.0f} ms of server CPU per 64-token request measured above: "
            f"**{100 * extra / request_cpu_us:.3f}%** of the server's work.",
            "",
            f"throughput on / off = **{ratio:.3f}** (median of {len(pairs)} rounds: "
            + " ".join(f"{x:.3f}" for x in pairs)
            + f"; cost {100 * (1 - ratio):.1f}%; floor ≤ 2%: {verdict}); the noise floor, the "
            f"second off / the first: {statistics.median(noise):.3f} ("
            + " ".join(f"{x:.3f}" for x in noise)
            + f"); server CPU per output token on / off = **{cpu_ratio:.3f}**",
        ]
    )
    print(body)
    if record is not None:
        replace_section(record, HEADING, body)


if __name__ == "__main__":
    typer.run(main)
