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
STARTS: dict[str, list[float]] = {}  # workspace (one per agent) -> when each lookup started
WAITS: dict[int, float] = {}  # id(process) -> seconds its turns waited for their tools
HEADS: dict[int, list[float]] = {}  # id(process) -> seconds each call started before its turn
CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Oslo", "Lisbon"]
WEATHER = {
    c: f"{c}: {12 + 3 * i} C, {'sunny' if i % 2 else 'cloudy'}" for i, c in enumerate(CITIES)
}


def _cities(ctx: ToolContext) -> list[str]:
    return CITIES


@tool(read_only=True)
def lookup(city: Choices(_cities), ctx: ToolContext) -> str:  # type: ignore[valid-type]
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    STARTS.setdefault(str(ctx.workspace), []).append(time.time())
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
    STARTS.clear()
    folders = [ws / f"agent{i}" for i in range(len(tasks))]
    for f in folders:
        f.mkdir(exist_ok=True)
    pids = [kernel.spawn(prog, t, workspace=f) for t, f in zip(tasks, folders, strict=True)]
    procs = [kernel.wait(pid, 900) for pid in pids]
    wall = time.monotonic() - t0
    for p, f in zip(procs, folders, strict=True):  # how long before its turn ended each started
        rows = kernel.store.query(
            "SELECT seq, kind, created_at FROM steps WHERE pid = ? ORDER BY seq", (p.pid,)
        )
        ended = {r["seq"]: r["created_at"] for r in rows if r["kind"] == "model_turn"}
        waits, turn = {}, None  # per turn: its end to its last tool result
        for r in rows:
            if r["kind"] == "model_turn":
                turn = r["created_at"]
            elif r["kind"] == "tool_result" and turn is not None:
                waits[turn] = r["created_at"] - turn
        WAITS[id(p)] = sum(waits.values())
        starts = iter(STARTS.get(str(f.resolve()), []))
        HEADS[id(p)] = [  # each call against the turn that asked for it, in order
            max(0.0, ended[seq] - next(starts))
            for seq, step in enumerate(p.steps)
            if isinstance(step, ModelTurn)
            for _ in step.tool_calls
        ]
    return wall, procs


def tool_wait(procs: list[Any]) -> str:
    return f"{sum(WAITS.get(id(p), 0.0) for p in procs) / len(procs):.2f}"


def engine_s(procs: list[Any]) -> str:
    total = sum(s.engine_seconds for p in procs for s in p.steps if isinstance(s, ModelTurn))
    return f"{total / len(procs):.2f}"


def head_start(procs: list[Any]) -> str:
    heads = [h for p in procs for h in HEADS.get(id(p), [])]
    return f"{sum(heads) / len(heads):.2f}" if heads else "-"


def local_part(agents: int, rounds: int) -> dict[str, Any]:
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
        modes = ["off", "stream", "speculate"]  # each later mode has a run to learn from
        for n in range(rounds):  # the order flips each round (a load that drifts evens out)
            for mode in modes if n % 2 == 0 else modes[::-1]:
                local.engine.call(lambda e: e.blocks.reset_prefix_cache()).result()  # cold
                wall, procs = run_wave(k, Path(tmp), mode, tasks)
                walls, _ = out.setdefault(mode, ([], procs))
                walls.append(wall)
                print(f"local {mode}: {wall:.1f}s, head start {head_start(procs)}s", flush=True)
    out = {m: (sum(w) / len(w), procs) for m, (w, procs) in out.items()}
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
    rounds: int = 2,
    record: Annotated[Path | None, typer.Option(help="Write a section here.")] = None,
) -> None:
    LATENCY[0] = latency
    scripted = scripted_part(calls, write_s, 3)
    local = local_part(agents, rounds)
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
                head_start(procs),
                tool_wait(procs),
                engine_s(procs),
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
                head_start(procs),
                tool_wait(procs),
                engine_s(procs),
            ]
        )
    table = md_table(
        [
            "workload, mode",
            "makespan s",
            "speed-up",
            "done",
            "same transcript",
            "head start s",
            "tool wait s/agent",
            "model s/agent",
        ],
        rows,
    )
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
        f"{write_s:g} s per call (median of 3 runs). Local makespans are means over {rounds} "
        "rounds, the order flipped each round and the prefix cache emptied before each run "
        "(the other local columns: the first round). "
        "'same transcript': what the model wrote and "
        "what the tools returned, against the off run. 'head start': how long, on average, a "
        "call started before the model turn that asked for it was journaled; 'tool wait': per "
        "agent, the seconds from each turn's end to its last tool result (what the features "
        "remove); 'model s': per agent, the engine's share of time on its model calls (it "
        "varies between runs with the load, and moves the makespan by as much).\n\n"
        f"{table}\n\n"
        "SmolLM2-135M writes one call a turn, so on the local model streaming can only start a "
        "call a few tokens before the turn ends; speculation starts it before the model "
        "begins. With several calls a turn, streamed calls overlap the tools with the writing "
        "of the next call, and with each other."
    )
    body += (
        "\n\nThe makespans move with the load (see 'model s'); 'tool wait' is the part these "
        "features remove, and the transcripts stay the same."
    )
    print(body)
    if record is not None:
        replace_section(record, "## Agents overlap (benchmarks/agents_overlap.py)", body)


if __name__ == "__main__":
    typer.run(main)
