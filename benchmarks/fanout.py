"""Fan-out: summarize 16 files with one sub-agent each (map_agents), then combine, against the
same work done sequentially (the same program, its children one at a time: the calls one agent
would make in turn). Both run on the real local model through the kernel; the makespan ratio
comes from the engine batching the children's calls.

The parent's first turn, the decision to fan out (the map_agents call), is scripted: a 135M
model does not plan, and that turn costs no tokens in either mode. Every summary and the
combining answer are the real model's (greedy), so the two modes do the same model work.

    .venv/bin/python benchmarks/fanout.py [--files 16] [--record BENCHMARKS.md]
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).parent))
from common import CORPUS, loadavg, machine, md_table, peak_rss_bytes, replace_section  # noqa: E402

from llmos.backends.base import ChatRequest, ChatResult, ToolCall, Usage  # noqa: E402
from llmos.kernel import Kernel, Program  # noqa: E402

PARENT = "You coordinate summaries."
CHILD = """name: summarize
system_prompt: Summarize the text in one sentence.
sampling: {temperature: 0, max_tokens: MAXTOK}
"""
TASK = "Combine the summaries of the files into one short paragraph."


class Orchestrator:
    """The local model, except the parent's first turn (the scripted map_agents call)."""

    def __init__(self, local: Any, inputs: list[str]) -> None:
        self.local, self.inputs = local, inputs
        self.name, self.kind = local.name, local.kind
        self.context_window = local.context_window
        self.enforces_schema = True

    async def chat(self, request: ChatRequest) -> ChatResult:
        msgs = request.messages
        if msgs[0]["content"] == PARENT and not any(m["role"] == "assistant" for m in msgs):
            args = {"program": "child.yaml", "inputs": self.inputs}
            raw = "<tool_call>" + json.dumps([{"name": "map_agents", "arguments": args}])
            call = ToolCall("fanout", "map_agents", json.dumps(args))
            return ChatResult(None, [call], Usage(), 0.0, "tool_calls", raw=raw + "</tool_call>")
        return await self.local.chat(request)

    def count_tokens(self, messages: list[Any], tools: list[Any]) -> int:
        return self.local.count_tokens(messages, tools)

    def release(self, key: str) -> None:
        self.local.release(key)

    async def aclose(self) -> None:
        return None


def workspace(root: Path, n: int, max_tokens: int) -> list[str]:
    (root / "child.yaml").write_text(CHILD.replace("MAXTOK", str(max_tokens)))
    inputs = []
    for i in range(n):
        text = CORPUS[i % len(CORPUS)]
        (root / f"file{i:02d}.txt").write_text(text)
        inputs.append(f"Summarize file{i:02d}.txt:\n{text}")
    return inputs


def run_mode(kernel: Kernel, ws: Path, parallel: int, n: int) -> dict[str, Any]:
    program = Program(
        name="fanout",
        system_prompt=PARENT,
        tools=["map_agents"],
        tool_choice=["map_agents", "none"],
        sampling={"temperature": 0, "max_tokens": 96},
        limits={"max_parallel_children": parallel, "max_children": n},
    )
    t0 = time.monotonic()
    p = kernel.wait(kernel.spawn(program, TASK, workspace=ws), 900)
    wall = time.monotonic() - t0
    kids = kernel.tree(p.pid)
    procs = [p, *kids]
    return {
        "wall": wall,
        "status": p.status.value,
        "children": len(kids),
        "done": sum(k.status.value == "done" for k in kids),
        "completion": sum(q.usage.completion_tokens for q in procs),
        "prompt": sum(q.usage.prompt_tokens for q in procs),
        "engine_s": sum(q.usage.engine_seconds for q in procs),
        "answers": [k.answer for k in kids],
        "combined": p.answer,
    }


def main(
    files: int = 16,
    max_tokens: int = 48,
    rounds: Annotated[int, typer.Option(help="Rounds; each later one flips the order.")] = 1,
    record: Annotated[Path | None, typer.Option(help="Write a section here.")] = None,
) -> None:
    from llmos.backends.local import LocalBackend

    local = LocalBackend()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        inputs = workspace(ws, files, max_tokens)
        with Kernel(backend=Orchestrator(local, inputs[:2]), db=ws / "warm.db") as k:
            run_mode(k, ws, 2, 2)  # warm-up: load, first compiles
        modes = [("sequential", 1), ("fan-out", files)]
        runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "fan-out": []}
        for n in range(rounds):  # flipping the order evens out a load that drifts
            for mode, parallel in modes if n % 2 == 0 else modes[::-1]:
                local.engine.call(lambda e: e.blocks.reset_prefix_cache()).result()  # cold
                with Kernel(backend=Orchestrator(local, inputs), db=ws / f"{mode}{n}.db") as k:
                    r = run_mode(k, ws, parallel, files)
                runs[mode].append(r)
                print(
                    f"{mode}: {r['wall']:.1f}s, {r['done']}/{r['children']} children done, "
                    f"{r['completion']} completion tokens",
                    flush=True,
                )
    results = {
        mode: {
            **rs[0],
            "wall": sum(r["wall"] for r in rs) / len(rs),
            "engine_s": sum(r["engine_s"] for r in rs) / len(rs),
        }
        for mode, rs in runs.items()
    }
    per_round = [a["wall"] / b["wall"] for a, b in zip(*runs.values(), strict=True)]
    asyncio.run(local.aclose())
    seq, fan = results["sequential"], results["fan-out"]
    same = sum(a == b for a, b in zip(seq["answers"], fan["answers"], strict=True))
    ratio = seq["wall"] / fan["wall"]
    rows = [
        [
            mode,
            f"{r['wall']:.1f}",
            f"{r['done']}/{r['children']}",
            str(r["prompt"]),
            str(r["completion"]),
            f"{r['completion'] / r['wall']:.1f}",
            f"{r['engine_s']:.1f}",
        ]
        for mode, r in results.items()
    ]
    table = md_table(
        [
            "mode",
            "makespan s (mean)",
            "children done",
            "prompt tok",
            "completion tok",
            "tok/s",
            "engine s (sum of shares, mean)",
        ],
        rows,
    )
    m = machine()
    body = (
        f"Command: `.venv/bin/python benchmarks/fanout.py --files {files} --rounds {rounds} "
        "--record BENCHMARKS.md`\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other work; load average at the "
        f"end {loadavg():.1f} (figures taken under load: the ratio, measured in the same run, "
        "is the number to read). "
        f"{files} files (~70-90 words each), one sub-agent per file (`map_agents`), each asked "
        f"for a one-sentence summary (greedy, max {max_tokens} tokens), then the parent combines "
        "them (max 96 tokens). The real local model (SmolLM2-135M) does every summary and the "
        "combine; the parent's fan-out call itself is scripted (no tokens). Sequential: the "
        "same program with `limits.max_parallel_children: 1`, so the children run one at a "
        "time, as one agent doing the same calls in turn. The prefix cache is emptied before each "
        "run (no run reuses another's prompts).\n\n"
        f"{table}\n\n"
        f"Makespan ratio (sequential / fan-out, mean makespans over {rounds} round(s), the "
        f"order flipped each round): **{ratio:.2f}x** (per round: "
        f"{', '.join(f'{x:.2f}x' for x in per_round)}). The children's answers are "
        f"identical in both modes for {same} of {files} (batched and unbatched greedy decoding "
        f"{'agree' if same == files else 'differ a little: batch shapes change float sums'}). "
        f"Peak RSS {peak_rss_bytes() / 2**20:.0f} MiB."
    )
    print(body)
    if record is not None:
        replace_section(record, "## Fan-out (benchmarks/fanout.py)", body)


if __name__ == "__main__":
    typer.run(main)
