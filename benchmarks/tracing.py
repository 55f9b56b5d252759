"""What tracing costs: `llmos serve` throughput at 16 clients with tracing off vs on.

    .venv/bin/python benchmarks/tracing.py [--duration 20] [--rounds 3] [--clients 16]
                                           [--record BENCHMARKS.md]

Two servers run side by side, each in its own process, on the same model: one with tracing
off (no endpoint: the no-op tracer), one exporting every request's span over OTLP/HTTP to a
collector stand-in in this process (it counts the spans' export requests and bytes). They
take turns, off/on/off/on..., so a load change on a shared machine hits both; each round,
`--clients` clients send streaming /v1/completions back to back for `--duration` seconds (64
output tokens each, EOS suppressed). Reported: output tok/s per round, the median per mode, and
the on/off ratio; the floor is a cost of at most 2%.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
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
    wait_until_serving,
)

MODEL = "smollm2-135m"
HEADING = "## Tracing (benchmarks/tracing.py)"
LLMOS = str(Path(sys.executable).with_name("llmos"))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(port: int, otlp: str | None, log: Path) -> subprocess.Popen:
    cmd = [LLMOS, "serve", "--port", str(port), "--no-kernel", "--responses-db", ":memory:"]
    if otlp:
        cmd += ["--otlp-endpoint", otlp]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


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


def main(
    duration: Annotated[float, typer.Option(help="Seconds per round.")] = 20.0,
    rounds: Annotated[int, typer.Option(help="Rounds per mode (they alternate).")] = 3,
    clients: Annotated[int, typer.Option(help="Concurrent streaming clients.")] = 16,
    record: Annotated[Path | None, typer.Option(help="Write the section here.")] = None,
) -> None:
    collector = Collector(("127.0.0.1", 0), _Handler)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    otlp = f"http://127.0.0.1:{collector.server_address[1]}"
    logs = Path("/tmp")
    ports = {"off": free_port(), "on": free_port()}
    procs = {
        mode: start_server(port, otlp if mode == "on" else None, logs / f"tracing-{mode}.log")
        for mode, port in ports.items()
    }
    tok_s: dict[str, list[float]] = {"off": [], "on": []}
    cpu_ms: dict[str, list[float]] = {"off": [], "on": []}  # server CPU ms per output token
    try:
        for mode, proc in procs.items():
            url = f"http://127.0.0.1:{ports[mode]}"
            detail = (logs / f"tracing-{mode}.log").read_text
            wait_until_serving(f"{url}/health", proc, 600, detail)
            asyncio.run(load(url, clients, 3.0))  # warm-up
        exports_before = collector.exports
        stall0, t0, load0 = cpu_stall_us(), time.monotonic(), loadavg()
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                url = f"http://127.0.0.1:{ports[mode]}"
                cpu0 = cpu_of(procs[mode].pid)
                n = asyncio.run(load(url, clients, duration))
                tok_s[mode].append(n / duration)
                cpu_ms[mode].append(1000 * (cpu_of(procs[mode].pid) - cpu0) / max(1, n))
                print(
                    f"round {r + 1} tracing {mode}: {n / duration:.1f} tok/s, "
                    f"{cpu_ms[mode][-1]:.2f} CPU ms/token",
                    flush=True,
                )
        stall = stall_share(stall0, time.monotonic() - t0)
        per_request = span_cost_us(otlp)
        time.sleep(6)  # the batch span processor exports every 5 s
        exports = collector.exports - exports_before
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(60)
        collector.shutdown()
    off, on = statistics.median(tok_s["off"]), statistics.median(tok_s["on"])
    ratio = on / off
    cpu_ratio = statistics.median(cpu_ms["on"]) / statistics.median(cpu_ms["off"])
    rows = [
        [
            mode,
            " / ".join(f"{v:.1f}" for v in tok_s[mode]),
            f"{statistics.median(tok_s[mode]):.1f}",
            f"{statistics.median(cpu_ms[mode]):.2f}",
        ]
        for mode in ("off", "on")
    ]
    verdict = "pass" if ratio >= 0.98 else "fail"
    request_cpu_us = statistics.median(cpu_ms["off"]) * 64 * 1000  # a 64-token request
    extra = per_request["on"] - per_request["off"]
    body = "\n".join(
        [
            f"`.venv/bin/python benchmarks/tracing.py --duration {duration:g} --rounds {rounds} "
            f"--clients {clients}`: {clients} streaming /v1/completions clients, 64 tokens each "
            "(EOS suppressed), alternating between a server with tracing off and one exporting "
            "each request's span over OTLP/HTTP to a local collector stand-in "
            f"({exports} export requests, {collector.bytes / 1e3:.0f} kB, received after the "
            "rounds). Load average "
            f"{load0:.1f} at the start; CPU stall {stall or float('nan'):.2f} "
            "(the share of the time some task waited for a core: other helpers share this "
            "machine, so single rounds are noisy; the ratio is of medians from the same run).",
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
            f"throughput on / off = **{ratio:.3f}** (cost {100 * (1 - ratio):.1f}%; "
            f"floor ≤ 2%: {verdict}); server CPU per output token on / off = "
            f"**{cpu_ratio:.3f}** (the cost measured in the server's own CPU time, which other "
            "processes' load does not move as much)",
        ]
    )
    print(body)
    if record is not None:
        replace_section(record, HEADING, body)


if __name__ == "__main__":
    typer.run(main)
