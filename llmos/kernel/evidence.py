"""The answer turn's evidence: what the tools returned, focused on the task.

A small model reads a chat of tool messages badly: it answers from the first file it saw, or
describes the JSON instead of reading it. So the turn where a program answers (`tool_choice`
"none" after tool results) ends with one plain message that a clerk would write down: the lines
the tools returned that bear most on the task (they hold its rarer words), each with its file
and line number, a heading's next line, and the file's first line (a table's header); then the
task's words that nothing returned mentions, and then the task itself. Measured on
`benchmarks/agent_tasks.py` (BENCHMARKS.md "Agent tasks").

- A file that only pointed to another file the process then read is left out: the pointer was
  followed, and its sentence ("it is in the file X") is not the answer.
- Nothing matches: the newest result is shown from its start instead.
- The message is bounded (`MAX_LINES` lines of at most `MAX_CHARS` characters), whatever the
  files hold.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llmos.kernel.argtypes import QUESTION_WORDS
from llmos.kernel.process import Process, ToolCallStep, ToolResultStep

MAX_LINES = 40
MAX_CHARS = 300
KEEP = 0.75  # a line is kept when it scores this share of the best line's score
_SEARCH_HIT = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): ?(?P<text>.*)$")
_WORDS = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True, slots=True)
class Line:
    source: str  # a file path, or the tool's name
    number: int
    text: str


def words(text: str) -> set[str]:
    """The words a line or a task is about (lower case, question words left out)."""
    return {w for w in _WORDS.findall(text.lower()) if len(w) > 1 and w not in QUESTION_WORDS}


def answer_prompt(proc: Process) -> str:
    """The last user message of an answer turn: the focused evidence, then the task."""
    items = _results(proc)
    task = proc.input.strip()
    if not items:
        return task
    asked = words(task)
    every = [line for _, lines in items for line in lines]
    chosen = _focus(items, asked)
    if not chosen:
        chosen = items[-1][1][:MAX_LINES]
    shown = "\n".join(
        f"{line.source} line {line.number}: {line.text.strip()[:MAX_CHARS]}" for line in chosen
    )
    seen = set().union(*(words(line.text) | words(line.source) for line in every))
    missing = [w for w in dict.fromkeys(_WORDS.findall(task.lower())) if w in asked - seen]
    if missing:
        shown += "\nNo file mentions: " + ", ".join(missing) + "."
    return f"{shown}\n\n{task}"


def _results(proc: Process) -> list[tuple[str, list[Line]]]:
    """Each successful result as (source, lines), oldest first: the same result once (its
    latest time), and a file that named a file read after it left out."""
    calls = {s.call_id: s for s in proc.steps if isinstance(s, ToolCallStep)}
    items: list[tuple[str, list[Line]]] = []
    for step in proc.steps:
        if not isinstance(step, ToolResultStep) or not step.ok or not step.output.strip():
            continue
        call = calls.get(step.call_id)
        lines = _lines(step.name, _arguments(call.arguments) if call else {}, step.output)
        if lines:
            item = (lines[0].source if _one_source(lines) else step.name, lines)
            items = [i for i in items if i != item] + [item]
    return [
        (source, lines)
        for k, (source, lines) in enumerate(items)
        if not any(
            later != source and later in "\n".join(line.text for line in lines)
            for later, _ in items[k + 1 :]
        )
    ]


def _one_source(lines: list[Line]) -> bool:
    return len({line.source for line in lines}) == 1


def _arguments(text: str) -> dict[str, object]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _lines(tool: str, args: dict[str, object], output: str) -> list[Line]:
    raw = [t for t in output.splitlines() if not t.startswith("[... ")]
    hits = [_SEARCH_HIT.match(t) for t in raw]
    if raw and all(hits):  # search results: each line is path:line: text
        return [Line(m["path"], int(m["line"]), m["text"]) for m in hits if m is not None]
    path = args.get("path")
    source = path if isinstance(path, str) and path not in ("", ".") else tool
    start = args.get("start_line", 1)
    first = start if isinstance(start, int) and start >= 1 else 1
    return [Line(source, first + i, t) for i, t in enumerate(raw)]


def _focus(items: list[tuple[str, list[Line]]], asked: set[str]) -> list[Line]:
    """The lines that bear most on the task, each with the next non-empty line of its source,
    and its source's first line (a header) where that was read. A line scores the task's words
    it holds, each weighted by how few lines hold it (`price` on every row of a table says
    less than `plum` on one); lines within `KEEP` of the best score are kept. A line that holds
    nothing but the task's words is a heading (`[plum]`, `"plum": {`): its next line joins it."""
    held = [[words(line.text) & asked for line in lines] for _, lines in items]
    df: dict[str, int] = {}
    for found in (w for item in held for ws in item for w in ws):
        df[found] = df.get(found, 0) + 1
    scores = [[sum(1 / df[w] for w in ws) for ws in item] for item in held]
    best = max((x for item in scores for x in item), default=0.0)
    if best == 0.0:
        return []
    chosen: list[Line] = []
    for (_, lines), item in zip(items, scores, strict=True):
        keep: set[int] = set()
        for k, score in enumerate(item):
            if score < best * KEEP:
                continue
            keep.add(k)
            heading = words(lines[k].text) <= asked
            if heading and k + 1 < len(lines) and lines[k + 1].text.strip():
                keep.add(k + 1)
            if lines[0].number == 1 and lines[0].source == lines[k].source:
                keep.add(0)
        chosen += [lines[k] for k in sorted(keep)]
    return chosen[-MAX_LINES:]
