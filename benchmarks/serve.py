"""Serving under load: `llmos serve` vs llama-cpp-python's OpenAI server, same GGUF, loopback.

    .venv/bin/python benchmarks/serve.py [--duration 20] [--concurrency 1,4,16,64]
                                         [--quick] [--skip-llamacpp] [--record BENCHMARKS.md]

Each server runs in its own process. For each concurrency C, C clients send streaming
`/v1/completions` requests back to back for `--duration` seconds: short distinct prompts,
64–128 output tokens each (EOS suppressed, so every request runs its full length), sampled at
temperature 1. The window is a hard bound: requests still open at its end are cut, and only
tokens received inside it count. Reported: output tokens/s, p50/p99 time to first token (a
request that got no token inside the window counts with the time it waited, a lower bound, and
the figure is marked `>`), and p50 inter-token latency. Connections are either reused
(keep-alive) or fresh for every request (`Connection: close`).

llama-cpp-python runs one request at a time; it is tuned as fairly as it allows:
`--interrupt_requests False` (else each new request cuts off the stream in progress) and
`--n_threads` 1 and 2.

llama.cpp's own `llama-server` (continuous batching over parallel slots; `make bench-setup`
builds it into .venv/bench/llama-server, or `--llama-server PATH`) runs too, once per slot
count in `--llama-slots` (`-np`), with its prompt cache on (its default).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replace_section, wait_until_serving  # noqa: E402

MODEL = "smollm2-135m"
TOPICS = [
    "a lighthouse",
    "the moon",
    "a lost key",
    "rain in Paris",
    "a robot cook",
    "old maps",
    "a quiet forest",
    "the first snow",
    "a chess game",
    "a paper boat",
    "a night train",
    "an empty theatre",
    "a stubborn cat",
    "the last bus",
    "a broken clock",
    "a glass city",
]
BOOT_TIMEOUT = 600.0
LLAMACPP_MODULES = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass(slots=True)
class Request:
    sent: float
    first: float | None = None
    stamps: list[float] = field(default_factory=list)  # arrival of each token-bearing chunk
    tokens: int = 0


@dataclass(slots=True)
class Level:
    server: str
    concurrency: int
    connections: str  # "keep-alive" or "fresh"
    start: float
    duration: float
    requests: list[Request]
    errors: int = 0
    stall: float = float("nan")  # fraction of the window some task waited for a CPU

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.requests) / self.duration

    def ttft(self, q: float) -> tuple[float, bool]:
        """q-th percentile TTFT, and whether it is a lower bound.

        A request with no token by the window's end counts with the time it waited (its true
        TTFT is longer), unless it waited less than the fastest TTFT seen: sent that late, it
        tells nothing."""
        end = self.start + self.duration
        seen = [r.first - r.sent for r in self.requests if r.first is not None]
        fastest = min(seen, default=0.0)
        pairs = sorted(
            [(t, False) for t in seen]
            + [
                (end - r.sent, True)
                for r in self.requests
                if r.first is None and end - r.sent >= fastest
            ]
        )
        if not pairs:
            return float("nan"), False
        i = round(q / 100 * (len(pairs) - 1))
        return pairs[i][0], any(censored for _, censored in pairs[: i + 1])

    @property
    def itl_p50(self) -> float:
        gaps = [b - a for r in self.requests for a, b in itertools.pairwise(r.stamps)]
        return statistics.median(gaps) if gaps else float("nan")


# -- servers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start a server process; yield its base URL once /v1/models answers; stop it."""
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(
            f"{url}/v1/models", proc, BOOT_TIMEOUT, lambda: proc.stderr.read()[-2000:]
        )  # type: ignore[union-attr]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def llmos_args(port: int, threads: int | None) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from llmos.cli.main import app; app()",
        "serve",
        "--port",
        str(port),
        "--max-num-seqs",
        "64",
        "--max-waiting",
        "4096",
        "--grace",
        "1",
        *(["--threads", str(threads)] if threads else []),
    ]


def llamacpp_args(port: int, gguf: Path, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--interrupt_requests",
        "False",
        "--n_ctx",
        "2048",
        "--verbose",
        "False",
    ]


LLAMA_SERVER = Path(__file__).resolve().parent.parent / ".venv" / "bench" / "llama-server"


def llama_server_args(binary: Path, port: int, gguf: Path, slots: int, threads: int) -> list[str]:
    return [
        str(binary),
        *("--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("--parallel", str(slots), "--cont-batching", "--ctx-size", str(slots * 1024)),
        *("--threads", str(threads), "--threads-batch", str(threads)),
        *("--no-webui", "--log-disable"),  # (its stderr is read only at exit)
    ]


# -- load ------------------------------------------------------------------------------------
async def one_request(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str], req: Request
) -> None:
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices") or ()):
                now = time.perf_counter()
                req.first = req.first or now
                req.stamps.append(now)
                req.tokens += 1


async def run_level(
    url: str,
    server: str,
    concurrency: int,
    duration: float,
    fresh: bool,
    extra: dict[str, Any],
    seed: int,
) -> Level:
    """One window of load. Prompts are numbered from `seed * 100_000`, so no two runs share one:
    a prefix cache must not make a later run look faster."""
    rng = random.Random(seed)
    headers = {"Connection": "close"} if fresh else {}
    limits = httpx.Limits(
        max_connections=concurrency + 8, max_keepalive_connections=0 if fresh else concurrency + 8
    )
    requests: list[Request] = []
    errors: list[str] = []
    counter = iter(range(seed * 100_000, (seed + 1) * 100_000))

    async def client_loop(client: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            body = {
                "model": MODEL,
                "prompt": f"{i}. Write about {TOPICS[i % len(TOPICS)]} and "
                f"the number {rng.randint(0, 9999)}.",
                "stream": True,
                "max_tokens": rng.randint(64, 128),
                "temperature": 1.0,
                **extra,
            }
            req = Request(time.perf_counter())
            requests.append(req)
            try:
                await one_request(client, body, headers, req)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        start = time.perf_counter()
        deadline = start + duration
        tasks = [asyncio.create_task(client_loop(client, deadline)) for _ in range(concurrency)]
        await asyncio.wait(tasks, timeout=duration)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for r in requests:  # only what arrived inside the window counts
        inside = [s for s in r.stamps if s <= deadline]
        r.tokens, r.stamps = len(inside), inside
        if r.first is not None and r.first > deadline:
            r.first = None
    if errors:
        print(f"  {len(errors)} failed requests, e.g. {errors[0]}", file=sys.stderr)
    return Level(
        server,
        concurrency,
        "fresh" if fresh else "keep-alive",
        start,
        duration,
        requests,
        len(errors),
    )


def cpu_stall_seconds() -> float | None:
    """Linux PSI: total time some runnable task waited for a CPU. Its growth over a level,
    divided by the level's length, tells how contended the cores were (0: not at all)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(line.rsplit("total=", 1)[1]) / 1e6


def measure(
    url: str,
    server: str,
    levels: list[int],
    duration: float,
    modes: list[bool],
    extra: dict[str, Any],
) -> list[Level]:
    asyncio.run(run_level(url, server, 2, 3.0, False, extra, seed=999))  # warm up
    results = []
    for n, c in enumerate(levels):
        for fresh in modes if n % 2 == 0 else modes[::-1]:  # neither mode always goes first
            before = cpu_stall_seconds()
            level = asyncio.run(
                run_level(url, server, c, duration, fresh, extra, seed=2 * c + fresh)
            )
            after = cpu_stall_seconds()
            if before is not None and after is not None:
                level.stall = (after - before) / duration
            results.append(level)
            print(row(level), flush=True)
    return results


# -- report ----------------------------------------------------------------------------------
def fmt_ttft(level: Level, q: float) -> str:
    value, censored = level.ttft(q)
    return f"{'>' if censored else ''}{value:.2f}"


def row(level: Level) -> str:
    return (
        f"| {level.server} | {level.concurrency} | {level.connections} | "
        f"{level.tokens_per_s:.1f} | {fmt_ttft(level, 50)} | {fmt_ttft(level, 99)} | "
        f"{level.itl_p50 * 1000:.0f} | {len(level.requests)} | {level.errors} | "
        f"{level.stall:.2f} |"
    )


HEADER = (
    "| server | concurrency | connections | output tok/s | TTFT p50 (s) | TTFT p99 (s) "
    "| ITL p50 (ms) | requests | errors | CPU stall |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


# llama.cpp's two servers: llama-cpp-python's (one request at a time; the 3x floor of the
# serving issue was set against it) and llama.cpp's own llama-server (parallel slots)
ANCHORS = {"llama-cpp-python server": "llama.cpp t", "llama-server": "llama.cpp server"}


def ratios(results: list[Level]) -> list[str]:
    """The better llmos setting vs the better setting of each llama.cpp server, per
    concurrency and connections."""
    lines = [
        "| concurrency | connections | against | tok/s llmos / llama.cpp | TTFT p50 llmos / "
        "llama.cpp (s) | floor (≥3× tok/s and lower TTFT at 16 and 64, vs llama-cpp-python) |",
        "|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r.concurrency, r.connections) for r in results)
    for c, mode in keys:
        same = [r for r in results if (r.concurrency, r.connections) == (c, mode)]
        ours = [r for r in same if r.server.startswith("llmos")]
        for anchor, prefix in ANCHORS.items():
            theirs = [r for r in same if r.server.startswith(prefix)]
            if not ours or not theirs:
                continue
            mine = max(ours, key=lambda r: r.tokens_per_s)
            best = max(theirs, key=lambda r: r.tokens_per_s)
            ratio = mine.tokens_per_s / max(best.tokens_per_s, 1e-9)
            t_mine, t_best = mine.ttft(50)[0], min(r.ttft(50)[0] for r in theirs)
            floor = "—"
            if c in (16, 64) and anchor == "llama-cpp-python server":
                floor = "pass" if ratio >= 3 and t_mine < t_best else "FAIL"
            lines.append(
                f"| {c} | {mode} | {anchor} | {ratio:.1f}× | {t_mine:.2f} / {t_best:.2f} "
                f"| {floor} |"
            )
    return lines


def machine_line() -> str:
    cpu = "?"
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"


def main(
    duration: Annotated[float, typer.Option(help="Seconds per concurrency level.")] = 20.0,
    concurrency: Annotated[str, typer.Option(help="Comma-separated levels.")] = "1,4,16,64",
    connections: Annotated[
        str, typer.Option(help="keep-alive, fresh, or both (each run once per level).")
    ] = "both",
    quick: Annotated[bool, typer.Option(help="Levels 1 and 16, 10 s, keep-alive only.")] = False,
    skip_llamacpp: Annotated[bool, typer.Option()] = False,
    llmos_threads: Annotated[
        str,
        typer.Option(
            help="Comma-separated torch thread counts to run llmos with; 0: torch's default."
        ),
    ] = "0",
    llama_server: Annotated[
        Path | None, typer.Option(help="llama.cpp's llama-server binary (make bench-setup).")
    ] = None,
    llama_slots: Annotated[str, typer.Option(help="llama-server -np values.")] = "16,64",
    record: Annotated[
        Path | None, typer.Option(help="Write the results section here (replacing it).")
    ] = None,
) -> None:
    levels = [int(c) for c in concurrency.split(",")]
    modes = {"keep-alive": [False], "fresh": [True]}.get(connections, [False, True])
    if quick:
        levels, duration, modes = [1, 16], 10.0, [False]
    from llmos.models.registry import resolve

    gguf = resolve(MODEL)
    print(HEADER, flush=True)
    results: list[Level] = []
    for threads in (int(t) for t in llmos_threads.split(",")):
        port = free_port()
        with server_process(llmos_args(port, threads or None), port) as url:
            name = f"llmos t{threads}" if threads else "llmos"
            results += measure(url, name, levels, duration, modes, {"ignore_eos": True})
    notes = []
    if skip_llamacpp:
        notes.append("llama.cpp: skipped (--skip-llamacpp).")
    elif not (missing := [m for m in LLAMACPP_MODULES if not importlib_available(m)]):
        from gguf import GGUFReader

        eos = int(GGUFReader(gguf).fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
        extra = {
            "logit_bias": {str(eos): -100.0},
            "top_k": 0,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
            "top_p": 1.0,
        }
        for threads in (1, 2):
            port = free_port()
            with server_process(llamacpp_args(port, gguf, threads), port) as url:
                results += measure(url, f"llama.cpp t{threads}", levels, duration, modes, extra)
    else:
        notes.append(
            f"llama.cpp: skipped, not importable: {', '.join(missing)} "
            "(`make bench-setup` builds llama-cpp-python; its server also needs "
            "sse-starlette, starlette-context and pydantic-settings)."
        )
    binary = llama_server or (LLAMA_SERVER if LLAMA_SERVER.exists() else None)
    if skip_llamacpp or binary is None:
        notes.append("llama-server: skipped (`make bench-setup` builds it).")
    else:
        from gguf import GGUFReader

        eos = int(GGUFReader(gguf).fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
        extra = {"logit_bias": {str(eos): -100.0}, "top_k": 0, "min_p": 0.0, "top_p": 1.0}
        for slots in (int(n) for n in llama_slots.split(",")):
            port = free_port()
            with server_process(llama_server_args(binary, port, gguf, slots, 2), port) as url:
                name = f"llama.cpp server -np {slots}"
                results += measure(url, name, levels, duration, modes, extra)
    for note in notes:
        print(note)
    ratio_lines = ratios(results)
    if len(ratio_lines) > 2:
        print("\n".join(ratio_lines))
    if record is not None:
        section = [
            f"`benchmarks/serve.py --duration {duration:g} --concurrency "
            f"{','.join(map(str, levels))} --connections {connections}` on "
            f"{machine_line()}. {MODEL} (Q4_1 GGUF); "
            "streaming /v1/completions, 64–128 output tokens per request (EOS "
            "suppressed), temperature 1, loopback. `>`: a lower bound (some requests got "
            "no token inside the window). CPU stall: the share of the window in which "
            "some task waited for a core (Linux PSI), i.e. how busy the machine was with "
            "other work too.",
            "",
            HEADER,
            *map(row, results),
            "",
        ]
        if len(ratio_lines) > 2:
            section += [
                "The better llmos setting against the better setting of each llama.cpp server:",
                "",
                *ratio_lines,
                "",
            ]
        section += notes
        replace_section(record, "## Serving (benchmarks/serve.py)", "\n".join(section))


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    typer.run(main)
