"""Small agent tasks in a folder of files, and how many an agent gets right.

    .venv/bin/python benchmarks/agent_tasks.py [--tasks 48] [--show] [--record BENCHMARKS.md]
        [--configs typed,untyped,http,agents-sdk]
    .venv/bin/python benchmarks/agent_tasks.py --grammar  # grammar build time at 1k/10k files

Each task is a workspace (files in), a question, and a check on the answer (a regex the answer
must match, and one it must not: the other candidates, so an answer that lists every value is
wrong). The kinds: reading a named file; finding which file holds a fact (list, then read);
searching for a word; reading a value from CSV, INI, JSON or Markdown; a two-step task (a file
that names another file); and a question whose answer is not in the folder, where the right
answer says so (and names no invented value). Names, values, file names, folders, phrasings and
distractor files are drawn from a seeded generator, so the suite is many tasks of each kind, not
a list of answers; `--seed` draws another suite of the same kinds.

Configurations (`--configs`):
- `typed`: llmos's default read-only assistant (`llmos run "question"`) on the local engine;
  its tool arguments are typed by the workspace, so the grammar admits only real paths;
- `untyped`: the same program with `typed_args=False` (plain `string` arguments);
- `http`: the typed program through `openai_http` against a real `llmos serve` (a subprocess on
  a free loopback port), so the server's tool calling is measured too;
- `agents-sdk`: the OpenAI Agents SDK's plain loop (`Runner.run`, `OpenAIChatCompletionsModel`
  on chat completions against the same `llmos serve`) with the same three tools as plain
  functions (they call llmos's `execute`, so their results and errors are the same text).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIRST = "Ada Bruno Chen Dara Elif Femi Greta Hugo Ines Jonas Kira Luca Mira Nils Omar Pia".split()
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dakar", "Perth", "Riga",
          "Tunis", "Porto", "Kyoto"]  # fmt: skip
FRUITS = ["apple", "pear", "plum", "cherry", "mango", "lemon", "peach", "grape", "kiwi", "fig"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "black"]
TEAMS = ["design", "sales", "support", "research", "finance", "legal"]
WORDS = ["zebra", "quartz", "falcon", "tundra", "velvet", "nectar", "cobalt", "meadow"]
FILLER = [
    "The office closes early on public holidays.",
    "Please keep the kitchen tidy and label your food.",
    "Printer paper is in the cabinet by the window.",
    "Visitors sign in at the front desk.",
    "The wifi password changes every month.",
    "Bikes go in the rack behind the building.",
]
DISTRACTORS = ["readme.md", "todo.txt", "ideas.txt", "office.md", "misc.txt", "lunch.txt",
               "parking.md", "docs/guide.md", "archive/old.txt"]  # fmt: skip
# Saying the folder does not hold it: a negation next to a word about information.
NOT_FOUND = (
    r"(?is)(\b(not|no|never|nothing|unable|\w+n't)\b.{0,60}?\b(say|says|said|mention|mentions|"
    r"mentioned|found|find|state|states|stated|given|listed|contain|contains|include|includes|"
    r"information|info|record|recorded|there|know|available|specified|provided)\b"
    r"|\bunknown\b|\bnowhere\b)"
)


@dataclass(slots=True)
class Task:
    name: str
    kind: str
    files: dict[str, str]
    question: str
    answer: str  # a regex the final answer must match (case-insensitive)
    expected: str = ""  # the value, for the report
    wrong: str | None = None  # a regex no right answer matches (the other candidates)

    def check(self, text: str | None) -> bool:
        text = text or ""
        if re.search(self.answer, text, re.IGNORECASE) is None:
            return False
        return self.wrong is None or re.search(self.wrong, text, re.IGNORECASE) is None

    def materialize(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        for rel, content in self.files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        return root


def _value(rng: random.Random) -> str:
    return f"{rng.randint(100, 999)}-{rng.choice(COLORS)}"


def _distractors(rng: random.Random, n: int, taken: set[str] = frozenset()) -> dict[str, str]:  # type: ignore[assignment]
    names = rng.sample([d for d in DISTRACTORS if d not in taken], n)
    return {name: " ".join(rng.sample(FILLER, 3)) + "\n" for name in names}


def _others(values: list[str], right: str) -> str | None:
    rest = [re.escape(v) for v in values if v != right]
    return rf"\b({'|'.join(rest)})\b" if rest else None


def named_file(rng: random.Random, i: int) -> Task:
    day, other = rng.sample(DAYS, 2)
    city = rng.choice(CITIES)
    folder = rng.choice(["", "", "docs/", "team/"])
    fname = folder + rng.choice(["notes.txt", "meeting.txt", "plan.md", "schedule.txt"])
    text = (
        f"Team notes\n\nThe release meeting is on {day} in the {city} room.\n{rng.choice(FILLER)}\n"
    )
    files = {fname: text, **_distractors(rng, rng.randint(0, 2))}
    if rng.random() < 0.5:  # another file has another meeting on another day
        files["calendar.txt"] = f"The budget review is on {other}.\n"
    q = rng.choice([
        f"What day is the release meeting? The answer is in {fname}.",
        f"Read {fname}: on which day is the release meeting?",
        f"According to {fname}, what day is the release meeting?",
    ])  # fmt: skip
    return Task(f"named-{i}", "named file", files, q, rf"\b{day}\b", day, _others(DAYS, day))


def which_file(rng: random.Random, i: int) -> Task:
    teams = rng.sample(TEAMS, 3)
    leads = rng.sample(FIRST, 3)
    target = rng.randrange(3)
    folder = rng.choice(["", "teams/"])
    files = {
        f"{folder}{team}.md": f"# The {team} team\n\nThe {team} team is led by {lead}.\n"
        f"{rng.choice(FILLER)}\n"
        for team, lead in zip(teams, leads, strict=True)
    }
    files.update(_distractors(rng, 1))
    q = rng.choice([
        f"Who leads the {teams[target]} team? One of the files in this folder says.",
        f"Find out who leads the {teams[target]} team.",
        f"Which person is the lead of the {teams[target]} team?",
    ])  # fmt: skip
    lead = leads[target]
    return Task(f"which-{i}", "which file", files, q, rf"\b{lead}\b", lead, _others(leads, lead))


def search_word(rng: random.Random, i: int) -> Task:
    word = rng.choice(WORDS)
    pool = ["alpha.txt", "beta.txt", "gamma.txt", "delta.txt", "omega.txt", "sigma.txt"]
    names = rng.sample(pool, 4)
    target = rng.choice(names)
    files = {n: " ".join(rng.sample(FILLER, 2)) + "\n" for n in names}
    files[target] = f"{rng.choice(FILLER)} The code word is {word}. {rng.choice(FILLER)}\n"
    q = rng.choice([
        f"Which file contains the word '{word}'? Give its name.",
        f"Search the files: which one mentions {word}?",
        f"In which file does the word {word} appear?",
    ])  # fmt: skip
    stems = [n.removesuffix(".txt") for n in names]
    stem = target.removesuffix(".txt")
    return Task(f"search-{i}", "search", files, q, rf"\b{stem}\b", target, _others(stems, stem))


def structured_value(rng: random.Random, i: int) -> Task:
    fmt = ["csv", "ini", "json", "md"][(i // len(KINDS)) % 4]
    fruits = rng.sample(FRUITS, 4)
    prices = rng.sample(range(2, 99), 4)
    k = rng.randrange(4)
    rows = list(zip(fruits, prices, strict=True))
    if fmt == "csv":
        body = "fruit,price\n" + "".join(f"{f},{p}\n" for f, p in rows)
    elif fmt == "ini":
        body = "".join(f"[{f}]\nprice = {p}\n\n" for f, p in rows)
    elif fmt == "json":
        body = json.dumps({f: {"price": p} for f, p in rows}, indent=2) + "\n"
    else:
        body = "| fruit | price |\n|---|---|\n" + "".join(f"| {f} | {p} |\n" for f, p in rows)
    name = rng.choice(["prices", "shop", "market"]) + "." + fmt
    files = {name: body, **_distractors(rng, rng.randint(0, 1))}
    q = rng.choice([
        f"What is the price of {fruits[k]} in {name}?",
        f"Look up the price of {fruits[k]} in {name}.",
        f"How much does {fruits[k]} cost, according to {name}?",
    ])  # fmt: skip
    price = str(prices[k])
    return Task(
        f"value-{fmt}-{i}", f"value ({fmt})", files, q, rf"\b{price}\b", price,
        _others([str(p) for p in prices], price),
    )  # fmt: skip


def two_step(rng: random.Random, i: int) -> Task:
    secret, decoy = _value(rng), _value(rng)
    target = rng.choice(["vault.txt", "keys/secret.txt", "box.txt", "deep/code.txt"])
    start = rng.choice(["start.txt", "readme.txt", "index.txt"])
    files = {
        start: f"The password is not here. It is in the file {target}.\n",
        target: f"password: {secret}\n",
        "old/password.txt": f"old password (expired): {decoy}\n",
        **_distractors(rng, 1),
    }
    q = rng.choice([
        f"What is the password? Start by reading {start}.",
        f"{start} says where the password is. What is the password?",
    ])  # fmt: skip
    return Task(f"two-step-{i}", "two steps", files, q, re.escape(secret), secret, re.escape(decoy))


def absent(rng: random.Random, i: int) -> Task:
    person = rng.choice(FIRST)
    what, values = rng.choice([("favourite colour", COLORS), ("home city", CITIES)])
    files = {
        "team.md": f"# Team\n\n{person} joined in {rng.randint(2015, 2024)}.\n",
        **_distractors(rng, 2),
    }
    q = rng.choice([
        f"What is {person}'s {what}? Check the files; if they do not say, say so.",
        f"Do the files say what {person}'s {what} is? If so, what is it?",
    ])  # fmt: skip
    wrong = rf"\b({'|'.join(values)})\b"
    return Task(f"absent-{i}", "not in the files", files, q, NOT_FOUND, "(says so)", wrong)


KINDS: list[Callable[[random.Random, int], Task]] = [
    named_file, which_file, search_word, structured_value, two_step, absent]  # fmt: skip


def make_tasks(n: int = 48, seed: int = 0) -> list[Task]:
    """`n` tasks, the kinds in turn, each drawn from its own seeded generator."""
    return [KINDS[i % len(KINDS)](random.Random(f"{seed}-{i}"), i) for i in range(n)]


# -- running ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Outcome:
    task: Task
    correct: bool
    answer: str | None
    steps: int  # model turns
    tokens: int  # prompt + completion, over the task
    status: str
    calls: list[str] = field(default_factory=list)


def run_kernel(tasks: list[Task], backend: object, program: object, root: Path) -> list[Outcome]:
    """Every task as a process on one kernel (so their model calls batch), each in a fresh
    workspace under `root`."""
    from llmos.kernel import Kernel
    from llmos.kernel.process import ModelTurn, ToolCallStep

    outcomes = []
    with Kernel(backend=backend, db=root / "kernel.db") as kernel:
        pids = [
            kernel.spawn(
                program, t.question, user="suite", workspace=t.materialize(root / "ws" / t.name)
            )
            for t in tasks
        ]
        for t, pid in zip(tasks, pids, strict=True):
            p = kernel.wait(pid, timeout=1800)
            calls = [f"{s.name}({s.arguments})" for s in p.steps if isinstance(s, ToolCallStep)]
            turns = sum(isinstance(s, ModelTurn) for s in p.steps)
            tokens = p.usage.prompt_tokens + p.usage.completion_tokens
            status = p.status.value if p.status.value == "done" else f"{p.status.value}: {p.reason}"
            outcomes.append(Outcome(t, t.check(p.answer), p.answer, turns, tokens, status, calls))
    return outcomes


def run_agents_sdk(tasks: list[Task], base_url: str, root: Path) -> list[Outcome]:
    """The OpenAI Agents SDK's own loop on the same model (chat completions on `base_url`)."""
    here = str(Path(__file__).resolve().parent)  # benchmarks/agents.py would shadow `agents`
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if "agents" in sys.modules and here in str(getattr(sys.modules["agents"], "__file__", "")):
        del sys.modules["agents"]
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    from llmos.cli.run import DEFAULT_PROMPT
    from llmos.kernel.tools import Policy, execute

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=base_url, api_key="none")
    model = OpenAIChatCompletionsModel(model="smollm2-135m", openai_client=client)
    policy = Policy(read_only=True)

    def agent_for(ws: Path, calls: list[str]) -> Any:
        def run(name: str, args: dict[str, Any]) -> str:
            calls.append(f"{name}({json.dumps(args)})")
            r = execute(name, args, ws, policy)
            return r.output if r.ok else f"error: {r.error}"

        @function_tool
        def list_dir(path: str = ".") -> str:
            """List a folder in the workspace (folders end with '/').

            Args:
                path: The folder, relative to the workspace.
            """
            return run("list_dir", {"path": path})

        @function_tool
        def read_file(path: str) -> str:
            """Read a text file in the workspace.

            Args:
                path: The file, relative to the workspace.
            """
            return run("read_file", {"path": path})

        @function_tool
        def search_files(query: str, path: str = ".") -> str:
            """Find lines containing a text (case-insensitive) in the workspace's files.

            Args:
                query: The text to look for (plain text, not a pattern).
                path: The folder to search, relative to the workspace.
            """
            return run("search_files", {"query": query, "path": path})

        return Agent(
            name="assistant",
            instructions=DEFAULT_PROMPT,
            model=model,
            tools=[list_dir, read_file, search_files],
            model_settings=ModelSettings(temperature=0.0, max_tokens=256),
        )

    async def one(t: Task) -> Outcome:
        ws = t.materialize(root / "sdk" / t.name)
        calls: list[str] = []
        try:
            result = await Runner.run(agent_for(ws, calls), t.question, max_turns=8)
        except Exception as exc:  # noqa: BLE001 - max turns, a model error: a failed task
            return Outcome(t, False, None, len(calls) + 1, 0, type(exc).__name__, calls)
        usage = [r.usage for r in result.raw_responses]
        tokens = sum(u.input_tokens + u.output_tokens for u in usage)
        answer = str(result.final_output)
        return Outcome(t, t.check(answer), answer, len(usage), tokens, "done", calls)

    async def every() -> list[Outcome]:
        return list(await asyncio.gather(*(one(t) for t in tasks)))

    return asyncio.run(every())


@contextmanager
def served() -> Iterator[str]:
    """A real `llmos serve` on a free loopback port; yields its /v1 URL."""
    exe = str(Path(sys.executable).parent / "llmos")
    proc = subprocess.Popen(
        [exe, "serve", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert proc.stdout is not None
    url = None
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"at (http://[\d.]+:\d+)/v1", line)
        url = m.group(1) + "/v1" if m else None
    if url is None:
        proc.kill()
        raise RuntimeError("llmos serve did not start")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def program_for(config: str) -> Any:
    from llmos.cli.run import default_program

    program = default_program()
    config, _, choice = config.partition("/")  # "typed/required+none": another tool_choice
    if config == "untyped":
        program.typed_args = False
    if choice:
        program.tool_choice = choice.split("+")
    return program


CONFIGS = ("typed", "untyped", "http", "agents-sdk")


class Shared:
    """A backend lent to one kernel after another: closing a kernel leaves it open."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def aclose(self) -> None:
        pass


@dataclass(slots=True)
class Score:
    config: str
    outcomes: list[Outcome]
    makespan: float

    @property
    def accuracy(self) -> float:
        return sum(o.correct for o in self.outcomes) / max(1, len(self.outcomes))

    def row(self) -> list[str]:
        n = len(self.outcomes)
        right = sum(o.correct for o in self.outcomes)
        steps = statistics.mean(o.steps for o in self.outcomes)
        tokens = statistics.mean(o.tokens for o in self.outcomes)
        return [
            self.config, f"{right}/{n} ({right / n:.0%})", f"{steps:.1f}", f"{tokens:,.0f}",
            f"{self.makespan:.0f} s",
        ]  # fmt: skip

    def by_kind(self) -> dict[str, str]:
        marks: dict[str, list[bool]] = {}
        for o in self.outcomes:
            marks.setdefault(o.task.kind.split(" (")[0], []).append(o.correct)
        return {k: f"{sum(v)}/{len(v)}" for k, v in marks.items()}


def run_configs(tasks: list[Task], configs: list[str]) -> list[Score]:
    from llmos.backends.local import LocalBackend
    from llmos.backends.openai_http import OpenAIHTTPBackend

    scores = []
    local = [c for c in configs if c.split("/")[0] in ("typed", "untyped")]
    if local:
        backend = LocalBackend()
        for config in local:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.monotonic()
                outcomes = run_kernel(tasks, Shared(backend), program_for(config), Path(tmp))
                scores.append(Score(config, outcomes, time.monotonic() - start))
                print(" | ".join(scores[-1].row()), scores[-1].by_kind(), flush=True)
        asyncio.run(backend.aclose())
    remote = [c for c in configs if c.split("/")[0] in ("http", "agents-sdk")]
    if remote:
        with served() as url:
            for config in remote:
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.monotonic()
                    if config == "http":
                        backend = OpenAIHTTPBackend(url, "smollm2-135m", send_priority=True)
                        outcomes = run_kernel(tasks, backend, program_for(config), Path(tmp))
                    else:
                        outcomes = run_agents_sdk(tasks, url, Path(tmp))
                    scores.append(Score(config, outcomes, time.monotonic() - start))
                    print(" | ".join(scores[-1].row()), scores[-1].by_kind(), flush=True)
    return scores


# -- grammar build time ------------------------------------------------------------------------
def grammar_times(n_files: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds, at `n_files` files in 100-file folders (plus an ignored .git and
    node_modules of as many again): listing the workspace (first and cached), resolving the
    typed tool schemas, compiling the tool-call grammar and building its matcher (first, and
    again from the cache), and the tool prompt's size in characters."""
    from llmos.cli.run import default_program
    from llmos.engine.structured import GrammarCompiler, _compile
    from llmos.engine.tool_calls import ChatTools, _tool_prompt
    from llmos.kernel import argtypes
    from llmos.kernel.toolspec import ToolContext
    from llmos.models.loader import load_checkpoint
    from llmos.models.registry import resolve

    ck = load_checkpoint(resolve("smollm2-135m"))
    compiler = GrammarCompiler(ck.tokenizer, ck.config.vocab_size)
    compiler.llg_tokenizer  # noqa: B018 - built once per engine, not per call
    program = default_program()
    table = program.tool_table
    out: dict[str, list[float]] = {}

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        out.setdefault(key, []).append(1e3 * (time.perf_counter() - t0))
        return value

    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for i in range(n_files):
                for top in ("", ".git/", "node_modules/"):
                    folder = root / f"{top}dir{i // 100:03d}"
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"file_{i:05d}_{r}.txt").write_text("x")
            ctx = ToolContext(root, program.policy)
            found = timed("listing (first)", lambda: argtypes.listing(root))  # noqa: B023
            assert len(found.files) == n_files, len(found.files)
            timed("listing (cached)", lambda: argtypes.listing(root))  # noqa: B023
            tools = timed(
                "typed schemas",
                lambda: [argtypes.resolve(table[n], ctx, True) for n in program.tools],  # noqa: B023
            )
            calls = ChatTools(tools, "required")
            lark = calls.grammar()
            _compile.cache_clear()  # a new workspace state: nothing cached yet
            timed("grammar compile", lambda: _compile("lark", lark))  # noqa: B023
            params = calls.constrain(__import__("llmos").SamplingParams())
            compiler._prototypes.clear()
            timed("matcher (first)", lambda: compiler.matchers(params))  # noqa: B023
            timed("matcher (cached)", lambda: compiler.matchers(params))  # noqa: B023
            out.setdefault("tool prompt chars", []).append(len(_tool_prompt(tools, False)))
    return {k: statistics.median(v) for k, v in out.items()}


def grammar_table(sizes: tuple[int, ...] = (100, 500, 1000, 10000)) -> str:
    from benchmarks.common import md_table

    results = {n: grammar_times(n) for n in sizes}
    keys = list(results[sizes[0]])
    rows = [[k] + [f"{results[n][k]:,.1f}" for n in sizes] for k in keys]
    per_call = [
        "**per call, first in a workspace state**",
        *[
            f"**{results[n]['listing (first)'] + results[n]['typed schemas'] + results[n]['grammar compile'] + results[n]['matcher (first)']:.1f}**"  # noqa: E501
            for n in sizes
        ],
    ]
    return md_table(["ms (median of 5)", *[f"{n:,} files" for n in sizes]], [*rows, per_call])


def main(
    tasks: int = 48,
    seed: int = 0,
    configs: str = "typed,untyped",
    show: bool = False,
    record: str | None = None,
    grammar: bool = False,
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import md_table, replace_section

    if grammar:
        print(grammar_table())
        return
    chosen = [c.strip() for c in configs.split(",") if c.strip()]
    bad = [c for c in chosen if c.split("/")[0] not in CONFIGS]
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; choose from {list(CONFIGS)}")
    suite = make_tasks(tasks, seed)
    scores = run_configs(suite, chosen)
    for score in scores:
        if show:
            print(score.config)
            for o in score.outcomes:
                mark = "OK  " if o.correct else "BAD "
                print("   ", mark + o.task.name, o.status, o.calls, repr(o.answer)[:140])
    if record:
        kinds = list(scores[0].by_kind())
        table = md_table(
            ["configuration", "correct", "model turns", "tokens/task", "makespan"],
            [s.row() for s in scores],
        )
        kind_table = md_table(
            ["configuration", *kinds],
            [[s.config, *[s.by_kind()[k] for k in kinds]] for s in scores],
        )
        body = (
            f"`.venv/bin/python benchmarks/agent_tasks.py --tasks {tasks} --seed {seed} "
            f"--configs {configs} --record {record}` (SmolLM2-135M on this machine's CPU, "
            f"greedy; all tasks of a configuration run at once on one kernel or server).\n\n"
            f"{table}\n\nBy kind:\n\n{kind_table}\n\n"
            "Grammar build time per model call, by workspace size "
            "(`benchmarks/agent_tasks.py --grammar`):\n\n" + grammar_table()
        )
        replace_section(Path(record), "## Agent tasks (benchmarks/agent_tasks.py)", body)


if __name__ == "__main__":
    import typer

    typer.run(main)
