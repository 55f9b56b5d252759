"""Kernel scale: N processes on one kernel at once, most on a scripted model (the kernel's own
overhead: the loop, the store, the tool threads), a handful on the real local model.

    .venv/bin/python benchmarks/kernel_scale.py [--processes 200] [--local 4] \
        [--record BENCHMARKS.md]

Each scripted process reads a file, calls its own `lookup` tool (which waits `--tool-seconds`,
as a real tool would), and answers: 3 model turns, 2 tool calls, 8 committed steps. Each local
process answers one question with the embedded model (greedy, 16 tokens). The makespan is from
the first spawn to the last process finished; no process may take longer than `--timeout`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine, md_table, replace_section  # noqa: E402

from llmos.backends.scripted import ScriptedBackend, call  # noqa: E402
from llmos.kernel import Kernel, Program, Status, tool  # noqa: E402

SECTION = "## Kernel scale (benchmarks/kernel_scale.py)"
TOOL_SECONDS = [0.05]
TURNS = [
    {"tool_calls": [call("read_file", path="notes.txt")], "delay": 0.01},
    {"tool_calls": [call("lookup", key="k")], "delay": 0.01},
    {"content": "the answer is 42", "delay": 0.01},
]


@tool(read_only=True)
def lookup(key: str) -> str:
    """Look a key up (slowly, like a real tool)."""
    time.sleep(TOOL_SECONDS[0])
    return f"value of {key}"


def scale(
    processes: int, local: int, tool_seconds: float, timeout: float, db: Path, ws: Path
) -> dict[str, Any]:
    """Run the workload; returns counts and timings (raises TimeoutError on a hang)."""
    TOOL_SECONDS[0] = tool_seconds
    (ws / "notes.txt").write_text("the answer is 42\n")
    scripted = Program(name="scripted", tools=["read_file", lookup])
    on_model = Program(
        name="local",
        model="local",
        system_prompt="Answer in one short sentence.",
        sampling={"temperature": 0.0, "max_tokens": 16},
        limits={"max_steps": 3},
    )
    with Kernel(backend=ScriptedBackend(TURNS), db=db) as kernel:
        load = 0.0
        if local:  # load the model (one warm-up process) before the clock starts
            t0 = time.monotonic()
            kernel.wait(kernel.spawn(on_model, "Say hi.", workspace=ws), timeout)
            load = time.monotonic() - t0
        started = time.monotonic()
        pids = [kernel.spawn(scripted, f"task {i}", workspace=ws) for i in range(processes)]
        local_pids = [
            kernel.spawn(on_model, f"Name a colour ({i}).", workspace=ws) for i in range(local)
        ]
        spawned = time.monotonic() - started
        finished = {pid: kernel.wait(pid, timeout) for pid in pids + local_pids}
        makespan = time.monotonic() - started
        pid_list = ",".join(map(str, pids + local_pids))
        row = kernel.store.one(f"SELECT COUNT(*) FROM steps WHERE pid IN ({pid_list})")
        steps = row[0] if row else 0
    done = [p for p in finished.values() if p.status is Status.DONE]
    return {
        "processes": processes,
        "local": local,
        "done": len(done),
        "scripted_done": sum(p.program.name == "scripted" for p in done),
        "local_done": sum(p.program.name == "local" for p in done),
        "steps": steps,
        "spawn_seconds": spawned,
        "makespan": makespan,
        "model_load_seconds": load,
        "failed": {p.pid: p.reason for p in finished.values() if p.status is not Status.DONE},
    }


def main(
    processes: Annotated[int, typer.Option("--processes")] = 200,
    local: Annotated[int, typer.Option("--local")] = 4,
    tool_seconds: Annotated[float, typer.Option("--tool-seconds")] = 0.05,
    timeout: Annotated[float, typer.Option("--timeout")] = 300.0,
    record: Annotated[Path | None, typer.Option("--record")] = None,
) -> None:
    before = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        r = scale(processes, local, tool_seconds, timeout, Path(tmp) / "k.db", Path(tmp))
    table = md_table(
        ["processes", "done", "committed steps", "spawn s", "makespan s", "steps/s"],
        [
            [
                f"{processes} scripted + {local} local",
                f"{r['done']}/{processes + local}",
                f"{r['steps']:,}",
                f"{r['spawn_seconds']:.2f}",
                f"{r['makespan']:.2f}",
                f"{r['steps'] / r['makespan']:.0f}",
            ]
        ],
    )
    m = machine()
    markdown = (
        f"{table}\n\n"
        f"- `.venv/bin/python benchmarks/kernel_scale.py --processes {processes} --local {local}"
        f" --tool-seconds {tool_seconds:g}`; machine: {m.get('cpu', '?')}, "
        f"{os.cpu_count()} cores, load average {before:.1f} at the start and {loadavg():.1f} "
        f"at the end, {time.strftime('%Y-%m-%d')}.\n"
        f"- Each scripted process: 3 model turns (10 ms each), a read_file and its own `lookup` "
        f"tool ({tool_seconds * 1000:.0f} ms), 8 steps committed to SQLite. The local processes "
        "answer one question on the embedded model (greedy, 16 tokens); loading it (a warm-up "
        f"process, {r['model_load_seconds']:.1f} s) is before the clock starts.\n"
        "- One asyncio loop runs every process; each tool call gets its own thread. Spawning "
        f"(one process at a time, from the caller's thread) is {r['spawn_seconds']:.2f} s of "
        "the makespan."
    )
    print(markdown)
    if r["failed"]:
        print(f"not done: {r['failed']}", file=sys.stderr)
    if record is not None:
        replace_section(record, SECTION, markdown)


if __name__ == "__main__":
    typer.run(main)
