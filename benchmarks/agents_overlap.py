"""Start work as early as its inputs allow: makespan of an agent workload with streamed tool
calls and speculation off and on, and whether the transcripts stay the same.

1. The real local model (SmolLM2-135M, greedy): N agents at once, each looks up 3 cities'
   weather, one `lookup` call a turn (a read-only tool with a set latency, like a network
   read), then answers. Modes: off; streamed calls; streamed + speculate_tools (the calls of
   the last run on the same input start while the model decides). SmolLM2 writes one call a
   turn, so streaming can only win the turn's last few tokens here; speculation wins the
   tool's latency at each turn it guesses right.
2. A scripted model that writes several calls a turn (as larger models do), each call taking
   a set time to write: streamed calls start while the model writes the next.

    .venv/bin/python benchmarks/agents_overlap.py [--agents 4] [--record BENCHMARKS.md]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).parent))
from common import loadavg, machine, md_table, replace_section  # noqa: E402

from llmos.backends.base import ChatRequest  # noqa: E402
from llmos.backends.scripted import ScriptedBackend  # noqa: E402
from llmos.kernel import Kernel, Program, tool  # noqa: E402
from llmos.kernel.process import ModelTurn, ToolResultStep  # noqa: E402
from llmos.kernel.toolspec import Choices, ToolContext  # noqa: E402

LATENCY = [1.0]  # seconds a lookup takes (set from --latency)
CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Oslo", "Lisbon"]
WEATHER = {
    c: f"{c}: {12 + 3 * i} C, {'sunny' if i % 2 else 'cloudy'}" for i, c in enumerate(CITIES)
}


def _cities(ctx: ToolContext) -> list[str]:
    return CITIES


@tool(read_only=True)
def lookup(city: Choices(_cities)) -> str:  # type: ignore[valid-type]
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    time.sleep(LATENCY[0])
    return WEATHER[city]


def program(mode: str) -> Program:
    return Program(
        name="weather",
        system_prompt="You are a helpful assistant. Use the lookup tool for each city.",
        tools=[lookup],
        tool_choice=["lookup", "lookup", "lookup", "none"],
        sampling={"temperature": 0, "max_tokens": 64},
        stream_tools=mode != "off",
        speculate_tools=mode == "speculate",
    )


def transcript(p: Any) -> list[Any]:
    """What the model wrote and what the tools returned (no timings, no call ids)."""
    out: list[Any] = []
    for s in p.steps:
        if isinstance(s, ModelTurn):
            out.append((s.raw, [(c.name, c.arguments) for c in s.tool_calls]))
        elif isinstance(s, ToolResultStep):
            out.append((s.ok, s.output, s.error))
    return out


def run_wave(kernel: Kernel, ws: Path, mode: str, tasks: list[str]) -> tuple[float, list[Any]]:
    prog = program(mode)
    t0 = time.monotonic()
    pids = [kernel.spawn(prog, t, workspace=ws) for t in tasks]
    procs = [kernel.wait(pid, 900) for pid in pids]
    return time.monotonic() - t0, procs


def local_part(agents: int) -> dict[str, Any]:
    from llmos.backends.local import LocalBackend

    tasks = [
        f"What is the weather in {a}, {b} and {c}?"
        for a, b, c in (
            (CITIES[i % 8], CITIES[(i + 3) % 8], CITIES[(i + 5) % 8]) for i in range(agents)
        )
    ]
    local = LocalBackend()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, Kernel(backend=local, db=Path(tmp) / "k.db") as k:
        run_wave(k, Path(tmp), "off", tasks[:1])  # warm-up
        for mode in ("off", "stream", "speculate"):  # each later mode has a run to learn from
            wall, procs = run_wave(k, Path(tmp), mode, tasks)
            out[mode] = (wall, procs)
            print(f"local {mode}: {wall:.1f}s", flush=True)
    return out


def scripted_part(calls: int, write_s: float, runs: int) -> dict[str, Any]:
    """One agent, one turn of `calls` lookups (each written in `write_s`), then an answer."""

    def turn(request: ChatRequest) -> dict[str, Any]:
        if any(m["role"] == "assistant" for m in request.messages):
            return {"content": "done"}
        return {
            "tool_calls": [
                {"id": f"c{i}", "name": "lookup", "arguments": {"city": CITIES[i]}}
                for i in range(calls)
            ],
            "call_delays": [write_s] * calls + [0.05],
        }

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with Kernel(backend=ScriptedBackend(turn), db=Path(tmp) / "k.db") as k:
            for mode in ("off", "stream"):
                walls, procs = [], []
                for _ in range(runs):
                    wall, ps = run_wave(k, Path(tmp), mode, ["weather in four cities"])
                    walls.append(wall)
                    procs += ps
                out[mode] = (sorted(walls)[len(walls) // 2], procs)
    return out


def main(
    agents: int = 4,
    latency: float = 1.0,
    calls: int = 4,
    write_s: float = 0.25,
    record: Annotated[Path | None, typer.Option(help="Write a section here.")] = None,
) -> None:
    LATENCY[0] = latency
    scripted = scripted_part(calls, write_s, 3)
    local = local_part(agents)
    base = [transcript(p) for p in local["off"][1]]
    rows = []
    for mode, (wall, procs) in local.items():
        same = sum(transcript(p) == b for p, b in zip(procs, base, strict=True))
        done = sum(p.status.value == "done" for p in procs)
        rows.append(
            [
                f"local, {mode}",
                f"{wall:.1f}",
                f"{local['off'][0] / wall:.2f}x",
                f"{done}/{agents}",
                f"{same}/{agents}",
            ]
        )
    sbase = [transcript(p) for p in scripted["off"][1]]
    for mode, (wall, procs) in scripted.items():
        same = sum(transcript(p) == b for p, b in zip(procs, sbase, strict=True))
        rows.append(
            [
                f"scripted, {mode}",
                f"{wall:.2f}",
                f"{scripted['off'][0] / wall:.2f}x",
                f"{len(procs)}/{len(procs)}",
                f"{same}/{len(procs)}",
            ]
        )
    table = md_table(["workload, mode", "makespan s", "speed-up", "done", "same transcript"], rows)
    m = machine()
    body = (
        "Command: `.venv/bin/python benchmarks/agents_overlap.py --record BENCHMARKS.md`\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other work; load average at the "
        f"end {loadavg():.1f} (taken under load; read the ratios). Local: {agents} agents at "
        f"once on the real local model (greedy), each 3 turns of one `lookup` call (a read-only "
        f"tool that takes {latency:g} s, like a network read) and an answer turn. Modes: "
        "`stream_tools: false`; streamed calls (the default); streamed + `speculate_tools: "
        "true` (run after the others, so the last run on the same input is there to predict "
        f"from). Scripted: one agent whose model writes {calls} calls in one turn, "
        f"{write_s:g} s per call (median of 3 runs). 'same transcript': what the model wrote "
        "and what the tools returned, against the off run.\n\n"
        f"{table}\n\n"
        "SmolLM2-135M writes one call a turn, so on the local model streaming can only start a "
        "call a few tokens before the turn ends; speculation starts it before the model "
        "begins. With several calls a turn, streamed calls overlap the tools with the writing "
        "of the next call, and with each other."
    )
    print(body)
    if record is not None:
        replace_section(record, "## Agents overlap (benchmarks/agents_overlap.py)", body)


if __name__ == "__main__":
    typer.run(main)
