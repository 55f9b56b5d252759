"""The cascade (issue 16): small model first, check, escalate only when a check fails.

    .venv/bin/python benchmarks/cascade.py [--record BENCHMARKS.md] [--per-kind 12] [--p 0.9]

Tasks with checkable answers, four kinds: schema-valid extraction, picking the right tool,
short arithmetic, reading a value from a file shown in the prompt. The small tier is the real
local model (SmolLM2-135M, greedy); the strong tier is a scripted oracle that answers
correctly with probability p, after a set latency, at a set price. The checks never see the
gold answer: a schema, tool-argument schemas, a python check that the answer is grounded in the
request (the name and age appear in the text; the value is in the file; the answer is a number),
and the answer tokens' confidence (their geometric-mean probability).

Rows: always-small, always-strong, and the real `Cascade` at each `--bar` (confidence). Then the
RouterBench way, from each task's precomputed outcomes (the small answer, its checks and
confidence; the oracle's draw): sweep the confidence bar and, for the baseline, a query-length
threshold (the longest queries go to the strong tier, without looking at any answer), and
report the smallest share of strong calls that reaches 95% of strong-only accuracy.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine, md_table, replace_section  # noqa: E402

from llmos.backends.base import ChatRequest, ChatResult, ToolCall, Usage  # noqa: E402
from llmos.kernel.meter import DEFAULT_PRICES, Price  # noqa: E402
from llmos.kernel.router import Cascade, CascadeConfig, Checks  # noqa: E402

console = Console(stderr=True)
STRONG_PRICE = Price(prompt_per_mtok=2.5, completion_per_mtok=10.0)  # a GPT-4o-class list price
STRONG_LATENCY = 0.4  # seconds per strong call
NAMES = ["Maria", "Kenji", "Amara", "Lars", "Priya", "Diego", "Chloe", "Tomas", "Aisha", "Omar"]
CITIES = ["Lyon", "Oslo", "Lima", "Cairo", "Perth", "Quito", "Seoul", "Dakar", "Riga", "Hanoi"]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {arg: {"type": "string"}},
                "required": [arg],
            },
        },
    }
    for name, desc, arg in [
        ("get_weather", "The current weather in a city.", "city"),
        ("send_email", "Send an email to an address.", "to"),
        ("search_web", "Search the web for a query.", "query"),
        ("read_file", "Read a file in the workspace.", "path"),
    ]
]


@dataclass(slots=True)
class Task:
    kind: str
    prompt: str
    gold: Any
    wrong: Any  # what the oracle says when its draw fails
    tools: list[dict[str, Any]]
    config: CascadeConfig
    schema: dict[str, Any] | None = None
    max_tokens: int = 32


def tasks(per_kind: int, rng: random.Random) -> list[Task]:
    out: list[Task] = []
    for i in range(per_kind):
        name, age, city = NAMES[i % len(NAMES)], rng.randint(18, 90), rng.choice(CITIES)
        filler = " She works as a nurse and enjoys long walks." * rng.randint(0, 3)
        text = f"{name} is {age} years old and lives in {city}.{filler}"
        out.append(
            Task(
                "extraction",
                f"Extract the person's name and age from this text as a JSON object with keys "
                f'"name" and "age", and nothing else.\n\nText: {text}',
                {"name": name, "age": age},
                {"name": name, "age": age + 1},
                [],
                CascadeConfig(python="__main__:grounded_person", min_confidence=None),
                PERSON,
                max_tokens=40,
            )
        )
        pick = [
            ("get_weather", "city", city, f"What's the weather like in {city} right now?"),
            (
                "send_email",
                "to",
                f"{name.lower()}@example.com",
                f"Email {name.lower()}@example.com that the meeting moved to 3pm.",
            ),
            (
                "search_web",
                "query",
                f"history of {city}",
                f"Search the web for the history of {city}.",
            ),
            ("read_file", "path", "notes.txt", "Open the file notes.txt and show me what it says."),
        ][i % 4]
        tool, arg, value, ask = pick
        out.append(
            Task(
                "tool",
                ask,
                (tool, value),
                ("search_web" if tool != "search_web" else "get_weather", value),
                TOOLS,
                CascadeConfig(min_confidence=0.85),
                max_tokens=48,
            )
        )
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice(["+", "-", "*"]) if i % 3 else "+"
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append(
            Task(
                "arithmetic",
                f"What is {a} {op} {b}? Reply with only the number.",
                value,
                value + 10,
                [],
                CascadeConfig(python="__main__:a_number", min_confidence=0.85),
                max_tokens=16,
            )
        )
        port, workers = rng.randint(1024, 9999), rng.randint(2, 64)
        key = rng.choice(["port", "workers"])
        lines = [f"host = {city.lower()}.internal", f"port = {port}", f"workers = {workers}"]
        rng.shuffle(lines)
        file = "\n".join(["[server]", *lines, f"log_level = {rng.choice(['info', 'debug'])}"])
        out.append(
            Task(
                "file_value",
                f"Here is the file config.ini:\n\n{file}\n\nWhat is the value of {key}? "
                "Reply with only the value.",
                port if key == "port" else workers,
                (port if key == "port" else workers) + 1,
                [],
                CascadeConfig(python="__main__:in_the_file", min_confidence=0.85),
                max_tokens=16,
            )
        )
    return out


# -- checks (they see the request and the answer, never the gold) --------------------------------
def grounded_person(answer: str | None, calls: list[ToolCall], messages: list[dict]) -> Any:
    value = json.loads(answer or "null")
    text = messages[-1]["content"] if messages[-1]["role"] == "user" else messages[0]["content"]
    if value["name"] not in text or str(value["age"]) not in text:
        return "the name or age is not in the text"
    return True


def last_number(text: str | None) -> str | None:
    found = re.findall(r"-?\d+", text or "")
    return found[-1] if found else None


def a_number(answer: str | None, calls: list[ToolCall], messages: list[dict]) -> Any:
    return last_number(answer) is not None or "the reply has no number"


def in_the_file(answer: str | None, calls: list[ToolCall], messages: list[dict]) -> Any:
    value = last_number(answer)
    task = next(m["content"] for m in messages if m["role"] == "user")
    ok = value is not None and re.search(rf"= {value}$", task, re.MULTILINE)
    return bool(ok) or "the value is not in the file"


def correct(task: Task, result: ChatResult) -> bool:
    if task.kind == "tool":
        if len(result.tool_calls) != 1:
            return False
        c = result.tool_calls[0]
        try:
            args = json.loads(c.arguments)
        except json.JSONDecodeError:
            return False
        return c.name == task.gold[0] and str(task.gold[1]).lower() in json.dumps(args).lower()
    text = (result.content or "").strip()
    if task.kind == "extraction":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        return isinstance(value, dict) and {k: value.get(k) for k in task.gold} == task.gold
    return last_number(text) == str(task.gold)  # the reply's last number is its answer


# -- the strong tier ----------------------------------------------------------------------------
class Oracle:
    """Right with probability p (one draw per task, fixed by the seed), after a set latency."""

    kind = "oracle"
    name = "oracle"
    context_window: int | None = None
    enforces_schema = True

    def __init__(self, by_prompt: dict[str, Task], draws: dict[str, bool], count: Any) -> None:
        self.by_prompt, self.draws, self.count = by_prompt, draws, count
        self.calls = 0

    def count_tokens(self, messages: list[dict], tools: list[dict]) -> int:
        return self.count(messages, tools)

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.calls += 1
        prompt = next(m["content"] for m in request.messages if m["role"] == "user")
        task = self.by_prompt[prompt]
        await asyncio.sleep(STRONG_LATENCY)
        value = task.gold if self.draws[prompt] else task.wrong
        usage = Usage(self.count(request.messages, request.tools), 0, 12)
        if task.kind == "tool":
            tool = next(t for t in TOOLS if t["function"]["name"] == value[0])
            arg = next(iter(tool["function"]["parameters"]["properties"]))
            call = ToolCall("call_0", value[0], json.dumps({arg: value[1]}))
            return ChatResult(None, [call], usage, 0.0, "tool_calls", raw=call.arguments)
        text = json.dumps(value) if task.kind == "extraction" else str(value)
        return ChatResult(text, [], usage, 0.0, "stop", raw=text)

    def release(self, key: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


def cost_of(result: ChatResult) -> float:
    price = STRONG_PRICE if result.backend == "oracle" else DEFAULT_PRICES["local"]
    return price.cost(result)


def request_of(task: Task) -> ChatRequest:
    sampling: dict[str, Any] = {"temperature": 0.0, "max_tokens": task.max_tokens}
    if task.schema is not None:  # the program decodes its answer under the schema
        sampling["json_schema"] = task.schema
    return ChatRequest(
        [{"role": "user", "content": task.prompt}],
        task.tools,
        "required" if task.tools else "auto",
        sampling,
    )


async def run_all(tier: Any, todo: list[Task], config: CascadeConfig | None) -> list[Any]:
    async def one(task: Task) -> Any:
        cfg = config or task.config
        return await tier.run(request_of(task), Checks(cfg, task.schema))

    return await asyncio.gather(*(one(t) for t in todo))


def smallest_share(
    points: list[tuple[float, float, float]], target: float
) -> tuple[float, float, float] | None:
    """The (share, accuracy, cost) point with the least strong-call share that reaches `target`."""
    ok = [pt for pt in points if pt[1] >= target - 1e-12]
    return min(ok, key=lambda pt: (pt[0], pt[2])) if ok else None


def main(
    record: Annotated[Path | None, typer.Option(help="Write a section here.")] = None,
    per_kind: int = 12,
    p: float = 0.9,
    bar: Annotated[list[float] | None, typer.Option(help="Live cascade bars.")] = None,
    seed: int = 16,
) -> None:
    from llmos.backends.local import LocalBackend

    bars_live = bar or [0.5, 0.85]
    rng = random.Random(seed)
    todo = tasks(per_kind, rng)
    draws = {t.prompt: rng.random() < p for t in todo}
    local = LocalBackend()
    oracle = Oracle({t.prompt: t for t in todo}, draws, local.count_tokens)

    def configure(
        cfg: CascadeConfig, min_confidence: float | None, samples: int | list[int] = 1
    ) -> CascadeConfig:
        c = CascadeConfig(**{f: getattr(cfg, f) for f in cfg.__slots__})  # type: ignore[attr-defined]
        c.min_confidence = min_confidence if cfg.min_confidence is not None else None
        c.samples = samples
        return c

    async def go() -> dict[str, Any]:
        small_only = Cascade([local], owns=False)
        strong_only = Cascade([oracle], owns=False)
        both = Cascade([local, oracle], owns=False)
        await run_all(small_only, todo[:4], None)  # warm up
        t0 = time.monotonic()
        # the small tier once per task, with its checks and confidence (no escalation)
        probe = [configure(t.config, 1e-9) for t in todo]
        small = await asyncio.gather(
            *(
                small_only.run(request_of(t), Checks(c, t.schema))
                for t, c in zip(todo, probe, strict=True)
            )
        )
        small_s = time.monotonic() - t0
        reasons = [
            await small_only.check(r, request_of(t), Checks(c, t.schema))
            for t, c, r in zip(todo, probe, small, strict=True)
        ]
        t0 = time.monotonic()
        strong = await run_all(strong_only, todo, CascadeConfig(tool_args=False))
        strong_s = time.monotonic() - t0
        live = []
        for b, k in [*((b, 1) for b in bars_live), (bars_live[-1], 3)]:
            oracle.calls = 0
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(
                    both.run(request_of(t), Checks(configure(t.config, b, [k, 1]), t.schema))
                    for t in todo
                )
            )
            live.append((b, k, results, oracle.calls, time.monotonic() - t0))
        return {
            "small": small,
            "reasons": reasons,
            "strong": strong,
            "live": live,
            "times": (small_s, strong_s),
        }

    out = asyncio.run(go())
    asyncio.run(local.aclose())
    n = len(todo)
    small_ok = [correct(t, r) for t, r in zip(todo, out["small"], strict=True)]
    strong_ok = [correct(t, r) for t, r in zip(todo, out["strong"], strict=True)]
    small_cost = [cost_of(r) for r in out["small"]]
    strong_cost = [cost_of(r) for r in out["strong"]]
    conf = [
        math.exp(sum(r.logprobs) / len(r.logprobs)) if r.logprobs else 1.0 for r in out["small"]
    ]
    passed = [why is None for why in out["reasons"]]  # deterministic checks (bar ~0 above)
    uses_conf = [t.config.min_confidence is not None for t in todo]

    def cascade_at(b: float) -> tuple[float, float, float]:
        up = [not ok or (u and c < b) for ok, u, c in zip(passed, uses_conf, conf, strict=True)]
        acc = sum(s if not e else g for s, g, e in zip(small_ok, strong_ok, up, strict=True))
        cost = sum(
            sc + (gc if e else 0) for sc, gc, e in zip(small_cost, strong_cost, up, strict=True)
        )
        return sum(up) / n, acc / n, cost

    lengths = [len(t.prompt) for t in todo]

    def by_length(cut: float) -> tuple[float, float, float]:
        up = [length >= cut for length in lengths]
        acc = sum(g if e else s for s, g, e in zip(small_ok, strong_ok, up, strict=True))
        cost = sum(gc if e else sc for sc, gc, e in zip(small_cost, strong_cost, up, strict=True))
        return sum(up) / n, acc / n, cost

    bars = sorted({0.0, 1.0 + 1e-9, *conf})
    cascade_pts = [cascade_at(b) for b in bars]
    length_pts = [by_length(c) for c in sorted({*lengths, max(lengths) + 1})]
    acc_strong = sum(strong_ok) / n
    target = 0.95 * acc_strong
    best_c = smallest_share(cascade_pts, target)
    best_l = smallest_share(length_pts, target)
    differ = 0
    for b, k, results, _, _ in out["live"]:
        if k > 1:
            continue  # re-samples are not in the replay
        off_up = [not ok or (u and c < b) for ok, u, c in zip(passed, uses_conf, conf, strict=True)]
        differ += sum((r.backend == "oracle") != e for r, e in zip(results, off_up, strict=True))

    def needed(point: tuple[float, float, float] | None) -> list[str]:
        if point is None:
            return ["never", "", ""]
        return [f"{point[0]:.0%}", f"{point[1]:.1%}", f"${point[2]:.5f}"]

    def kind_acc(ok: list[bool]) -> str:
        kinds = ["extraction", "tool", "arithmetic", "file_value"]
        per = [
            sum(o for o, t in zip(ok, todo, strict=True) if t.kind == k)
            / sum(t.kind == k for t in todo)
            for k in kinds
        ]
        return " / ".join(f"{x:.0%}" for x in per)

    small_s, strong_s = out["times"]
    rows = [
        [
            "always small (SmolLM2-135M)",
            f"{sum(small_ok) / n:.1%}",
            kind_acc(small_ok),
            f"${sum(small_cost):.5f}",
            "0%",
            f"{small_s:.1f}",
        ],
        [
            f"always strong (oracle, p={p})",
            f"{acc_strong:.1%}",
            kind_acc(strong_ok),
            f"${sum(strong_cost):.5f}",
            "100%",
            f"{strong_s:.1f}",
        ],
    ]
    for b, k, results, calls, wall in out["live"]:
        ok = [correct(t, r) for t, r in zip(todo, results, strict=True)]
        cost = sum(cost_of(r) + sum(cost_of(a.result) for a in r.attempts) for r in results)
        rows.append(
            [
                f"cascade, confidence bar {b}" + (f", small sampled up to {k}x" if k > 1 else ""),
                f"{sum(ok) / n:.1%}",
                kind_acc(ok),
                f"${cost:.5f}",
                f"{calls / n:.0%}",
                f"{wall:.1f}",
            ]
        )
    table = md_table(
        ["route", "accuracy", "extract / tool / arith / file", "cost", "strong calls", "wall s"],
        rows,
    )
    sweep_rows = [
        ["cascade (checks, then confidence bar)", *needed(best_c)],
        ["query-length threshold (longest go strong)", *needed(best_l)],
    ]
    fails = sum(not x for x in passed)
    m = machine()
    body = (
        "Command: `.venv/bin/python benchmarks/cascade.py --record BENCHMARKS.md`\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, shared; load average at the end "
        f"{loadavg():.1f}. {n} tasks ({per_kind} per kind: schema-valid extraction, picking "
        "the right one of 4 tools, 2-digit arithmetic, a value from a config file in the "
        "prompt). Small tier: the real local model, greedy. Strong tier: a scripted oracle, "
        f"right with p={p} (one seeded draw per task), {STRONG_LATENCY}s per call, "
        "$2.50/$10 per M prompt/completion tokens; the local model is priced by engine time "
        "($0.10 an hour). Checks never see the gold answer: the output schema, the tools' "
        "argument schemas, a python check that the answer is grounded in the request (the "
        "name and age are in the text, the value is in the file, the reply is a number), then "
        "the answer tokens' geometric-mean probability against the bar (tool, arithmetic and "
        "file tasks). Each escalated attempt is metered to its own backend.\n\n"
        + table
        + f"\n\nThe small tier failed a deterministic check on {fails} of {n} tasks. A live "
        "cascade's cost includes the small tier's call on every task and, on escalation, the "
        "failed attempt and its reason in the strong tier's prompt (feedback). The live runs' "
        f"escalation decisions differ from the replay below on {differ} of "
        f"{n * len(bars_live)} task runs (re-samples are not replayed). With up to 3 samples "
        "the small tier is asked again at temperature 0.7 with seeds +1 and +2 before the "
        "strong tier is.\n\n"
        f"Share of strong calls needed to reach 95% of strong-only accuracy "
        f"({target:.1%}), sweeping each router's one knob over the precomputed outcomes:\n\n"
        + md_table(["router", "strong calls needed", "accuracy there", "cost there"], sweep_rows)
        + (
            f"\n\nAt that point the cascade costs {best_c[2] / sum(strong_cost):.0%} of "
            "always-strong (replayed, without the feedback context a live escalation adds)."
            if best_c is not None
            else ""
        )
    )
    console.print(body)
    if record is not None:
        replace_section(record, "## Cascade (benchmarks/cascade.py)", body)


if __name__ == "__main__":
    typer.run(main)
