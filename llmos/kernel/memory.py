"""The context window as memory. The prompt is a projection of the transcript (`to_messages`);
when it would not fit, `compact` makes it fit, and says what it did (a `Compaction`, which the
loop records as a transcript step). What it does, in order, until the prompt fits:

1. elide old tool outputs (oldest first);
2. drop the oldest messages, a whole unit at a time (an assistant call with all its results),
   leaving one note that stands for them (a count, a summary, or a pointer to recall memory);
3. as a last resort, elide the tool outputs and long messages of the newest units too;
4. else raise `ContextOverflow`: nothing is ever cut silently.

The pinned head (system prompt with its core memory, the tools, the task) is never touched, and
a compaction cuts down to `low_water` of the room, so later turns only append: they reuse the
previous compaction (`prior`) and keep the prompt's front byte-identical for the prefix cache.
Token counts are the backend's own (the local engine's tokenizer)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from llmos.backends.base import Message
from llmos.kernel import memory_tools
from llmos.kernel.memory_config import MemoryConfig
from llmos.kernel.process import (
    ErrorStep,
    ModelTurn,
    Process,
    ToolResultStep,
    register_step,
)

# An answer that only restated a failed call's error gets this once (the error names the
# valid choices, e.g. the nearest files).
RETRY = (
    "That answer only repeats the tool's error: {why}. Call the tool again with one of the "
    "valid choices it names, or answer the task from what the tools did return."
)
# The answer turn of a program whose tool_choice says "none" there (answer_turn "chat"): the
# task restated after the tool results (a small model otherwise continues the pattern of calls).
ANSWER = "Using what the tools returned above, answer in one sentence: {task}"
KEEP_RECENT = 4  # messages at the end that are never trimmed
REPAIR = (
    "Your last reply could not be used: {why}. Reply again: either only a JSON tool call "
    "object, or your final answer as plain text."
)
ELIDE_OVER = 80  # characters: shorter contents are not worth eliding


class ContextOverflow(Exception):
    """The pinned part of the prompt (or its newest message) alone does not fit."""


@dataclass(slots=True)
class Compaction:
    """What the memory manager did to fit one model call: a transcript step ("memory")."""

    kind: ClassVar[str] = "memory"
    policy: str
    limit: int  # the room for the prompt, in tokens
    tokens_before: int
    tokens_after: int
    cut: int = 0  # body messages (after the pinned head) dropped, oldest first
    elided: list[int] = field(default_factory=list)  # body indices whose content was elided
    note: str = ""  # what stands for the dropped messages
    summarized: int = 0  # messages this call folded into the summary (summarize)
    paged_in: list[str] = field(default_factory=list)  # recall hits paged in (page)
    reused: bool = False  # the previous compaction's cut: the prompt's front is unchanged
    estimate: bool = False  # counts are a remote backend's estimate, not its tokenizer's
    overflow: str | None = None  # why it could not fit (the call was not made)
    summary_prompt_tokens: int = 0  # what the summarizer's calls cost (metered separately)
    summary_completion_tokens: int = 0


@dataclass(slots=True)
class SummaryTurn:
    """The summarizer's model call ("memory_summary"): metered to the process (a usage row,
    and `usage(proc)`), never projected into the prompt, and not one of the program's turns."""

    kind: ClassVar[str] = "memory_summary"
    content: str | None
    raw: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    cost: float = 0.0
    finish_reason: str | None = None
    backend: str | None = None


register_step(Compaction)
register_step(SummaryTurn, metered=True)  # the summarizer's tokens are the process's


def system_prompt(proc: Process) -> str:
    text = proc.program.system_prompt
    if proc.program.output_schema is not None:
        text += (
            "\n\nYour final answer must be only a JSON value that matches this JSON "
            f"schema:\n{json.dumps(proc.program.output_schema)}"
        )
    if proc.program.memory_config.policy == "page":
        text += "\n\n" + memory_tools.render_core(memory_tools.core_blocks(proc))
    return text


def to_messages(proc: Process) -> list[Message]:
    msgs: list[Message] = [
        {"role": "system", "content": system_prompt(proc)},
        {"role": "user", "content": proc.input},
    ]
    for step in proc.steps:
        if isinstance(step, ModelTurn):
            m: Message = {"role": "assistant", "content": step.content, "raw": step.raw}
            if step.tool_calls and not step.malformed:
                m["tool_calls"] = [c.to_openai() for c in step.tool_calls]
            elif step.content is None:
                m["content"] = step.raw
            msgs.append(m)
        elif isinstance(step, ToolResultStep):
            msgs.append(
                {
                    "role": "tool",
                    "tool_call_id": step.call_id,
                    "name": step.name,
                    "content": step.observation(),
                }
            )
        elif isinstance(step, ErrorStep) and step.what in ("malformed_output", "bad_answer"):
            msgs.append({"role": "user", "content": REPAIR.format(why=step.message)})
        elif isinstance(step, ErrorStep) and step.what == "restated_error":
            msgs.append({"role": "user", "content": RETRY.format(why=step.message)})
    return msgs


class Counter:
    """Token counts: exact for a whole prompt (`total`), and per message (`one`, cached), so
    `compact` sums instead of re-tokenizing the prompt after every change."""

    def __init__(
        self,
        count_tokens: Callable[[list[Message], list[dict[str, Any]]], int],
        tools: list[dict[str, Any]] | None = None,
        estimate: bool = False,
    ) -> None:
        self.count_tokens, self.tools, self.estimate = count_tokens, tools or [], estimate
        self._cache: dict[tuple[Any, ...], int] = {}
        self._base: int | None = None

    def total(self, msgs: list[Message]) -> int:
        return self.count_tokens(msgs, self.tools)

    def one(self, m: Message) -> int:
        calls = m.get("tool_calls")
        key = (m["role"], m.get("content"), m.get("raw"), m.get("name"), m.get("tool_call_id"))
        key += (json.dumps(calls, sort_keys=True),) if calls else ()
        n = self._cache.get(key)
        if n is None:
            if self._base is None:  # what a template adds once per prompt (a default system)
                empty: Message = {"role": "user", "content": ""}
                one, two = (self.count_tokens([empty] * k, []) for k in (1, 2))
                self._base = max(0, 2 * one - two)
            n = max(1, self.count_tokens([m], []) - self._base)
            if len(self._cache) > 20_000:
                self._cache.clear()
            self._cache[key] = n
        return n


def units(body: Sequence[Message]) -> list[int]:
    """Where each droppable unit starts: an assistant message with tool calls owns the tool
    results that follow it (dropping one without the other leaves an orphan)."""
    starts = []
    for i, m in enumerate(body):
        if m["role"] == "tool" and starts and i > 0:
            continue
        starts.append(i)
    return starts


def elided(m: Message) -> Message:
    what = "output" if m["role"] == "tool" else "message"
    n = len(m.get("content") or "")
    out = {**m, "content": f"[{what} elided to save context: {n} characters]"}
    out.pop("raw", None)
    return out


def _elidable(m: Message) -> bool:
    return len(m.get("content") or "") > ELIDE_OVER and not m.get("tool_calls")


def build(
    msgs: list[Message], c: Compaction, pinned: int = 2, paged: Message | None = None
) -> list[Message]:
    """The prompt a compaction stands for (the transcript's messages are not changed)."""
    head, body = msgs[:pinned], msgs[pinned:]
    gone = set(c.elided)
    kept = [elided(m) if i in gone else m for i, m in enumerate(body) if i >= c.cut]
    out = head + ([{"role": "user", "content": c.note}] if c.cut else []) + kept
    if paged is not None:  # at the end, before the newest unit: the prefix stays put
        at = len(out) - 1
        while at > pinned and out[at]["role"] == "tool":
            at -= 1
        out.insert(max(pinned, at), paged)
    return out


def drop_note(n: int, policy: str) -> str:
    if policy == "page":
        return (
            f"[{n} earlier messages left the context window; they are in recall memory: "
            "search them with recall_search]"
        )
    return f"[{n} earlier messages were dropped to fit the context]"


def compact(
    msgs: list[Message],
    counter: Counter,
    limit: int,
    cfg: MemoryConfig | None = None,
    *,
    prior: Compaction | None = None,
    pinned: int = 2,
    reserve: int = 0,
    note_for: Callable[[list[Message], int], str] | None = None,
) -> tuple[list[Message], Compaction | None]:
    """`msgs` made to fit in `limit` tokens (with `reserve` tokens left over for text the
    caller adds: a summary, paged-in memory), and what was done; None when nothing had to be.
    Raises ContextOverflow when even the pinned head and the newest message cannot fit."""
    cfg = cfg or MemoryConfig()
    note_for = note_for or (lambda _dropped, cut: drop_note(cut, cfg.policy))
    head, body = msgs[:pinned], msgs[pinned:]
    head_n = counter.total(head)
    sizes = [counter.one(m) for m in body]
    before = head_n + sum(sizes)
    if prior is None and before <= limit:
        return msgs, None
    room = limit - reserve
    if prior is not None and prior.cut <= len(body):  # the last compaction still fits: reuse
        c = replace(prior, reused=True, summarized=0, paged_in=[], overflow=None)
        c.summary_prompt_tokens = c.summary_completion_tokens = 0
        est = _estimate(c, head_n, sizes, body, counter)
        if est + limit // 100 + 8 <= room:  # the per-message sum, with a margin: no recount
            c.tokens_before, c.tokens_after, c.limit = before, est, limit
            return build(msgs, c, pinned), c
        if est <= room:
            out, c = _finish(msgs, c, before, counter, limit, pinned)
            if c.tokens_after + reserve <= limit:
                return out, c
    c = Compaction(cfg.policy, limit, before, 0, estimate=counter.estimate)
    if prior is not None:  # what was gone stays gone: the front stays as it was
        c.cut, c.elided, c.note = min(prior.cut, len(body)), list(prior.elided), prior.note
    for attempt in range(3):
        _shrink(c, body, sizes, head_n, int(room * cfg.low_water), room, cfg, counter, note_for)
        est = _estimate(c, head_n, sizes, body, counter)
        if attempt == 0 and est + limit // 100 + 8 <= room:  # well inside: no recount
            c.elided.sort()
            c.tokens_before, c.tokens_after, c.limit = before, est, limit
            return build(msgs, c, pinned), c
        out, c = _finish(msgs, c, before, counter, limit + 0, pinned)
        if c.tokens_after + reserve <= limit:
            return out, c
        room -= c.tokens_after + reserve - limit + 4 * (attempt + 1)  # the sums were short
    raise ContextOverflow(
        f"the prompt cannot fit: {c.tokens_after} tokens after compaction, room for {limit}"
    )


def _estimate(
    c: Compaction, head_n: int, sizes: list[int], body: list[Message], counter: Counter
) -> int:
    gone = set(c.elided)
    n = head_n + (counter.one({"role": "user", "content": c.note}) if c.cut else 0)
    for i in range(c.cut, len(body)):
        n += counter.one(elided(body[i])) if i in gone else sizes[i]
    return n


def _shrink(
    c: Compaction,
    body: list[Message],
    sizes: list[int],
    head_n: int,
    target: int,
    room: int,
    cfg: MemoryConfig,
    counter: Counter,
    note_for: Callable[[list[Message], int], str],
) -> None:
    """Cut `c` down until its estimate is under `target` (else under `room`, else raise).
    The estimate is kept as a running sum: each change costs one message's count."""
    gone = set(c.elided)
    prior_cut = c.cut

    def size(i: int) -> int:
        return counter.one(elided(body[i])) if i in gone else sizes[i]

    def note_size() -> int:
        return counter.one({"role": "user", "content": c.note}) if c.cut else 0

    kept = sum(size(i) for i in range(c.cut, len(body)))
    note_n = note_size()

    def est() -> int:
        return head_n + note_n + kept

    def elide(i: int) -> None:
        nonlocal kept
        if i not in gone and _elidable(body[i]):
            kept -= sizes[i]
            gone.add(i)
            kept += size(i)

    recent = max(0, len(body) - cfg.keep_recent)
    for i in range(c.cut, recent):  # 1: old tool outputs, oldest first
        if est() <= target:
            break
        if body[i]["role"] == "tool":
            elide(i)
    starts = [s for s in units(body) if s > c.cut]
    last = starts[-1] if starts else c.cut  # the newest unit is never dropped
    guess = counter.one({"role": "user", "content": note_for([], max(1, c.cut))}) + 8
    while starts and est() + (0 if c.cut else guess) > target:  # 2: drop the oldest unit
        if len(body) - starts[0] < cfg.keep_recent and est() + guess <= room:
            break  # the recent messages go only as a last resort
        new = starts.pop(0)
        kept -= sum(size(i) for i in range(c.cut, new))
        gone -= set(range(c.cut, new))
        c.cut, note_n = new, guess  # the note is written once the cut is known
        if new >= last:
            break
    if c.cut and (c.cut != prior_cut or not c.note):  # the same cut keeps its note
        c.note = note_for(body[: c.cut], c.cut)
        if counter.one({"role": "user", "content": c.note}) > room // 4:  # a note kept short
            c.note = drop_note(c.cut, cfg.policy)
        note_n = note_size()
    for i in range(c.cut, len(body) - 1):  # 3: the newest units' long contents
        if est() <= room:
            break
        elide(i)
    if est() > room and body and body[-1]["role"] == "tool":
        elide(len(body) - 1)  # the newest result, elided (its call stays)
    c.elided = sorted(gone)
    if est() > room:
        raise ContextOverflow(
            f"the prompt cannot fit in {room} tokens: the pinned system prompt, tools and task "
            f"take {head_n} and the newest message {sizes[-1] if sizes else 0}"
        )


def _finish(
    msgs: list[Message], c: Compaction, before: int, counter: Counter, limit: int, pinned: int
) -> tuple[list[Message], Compaction]:
    c.elided.sort()
    out = build(msgs, c, pinned)
    c.tokens_before, c.tokens_after, c.limit = before, counter.total(out), limit
    return out, c


def summarize(dropped: list[Message]) -> str:
    """An extractive summary: which calls were made and the first line of what came back."""
    lines = []
    for m in dropped:
        for c in m.get("tool_calls", []):
            lines.append(f"- called {c['function']['name']}({c['function']['arguments']})")
        if m["role"] == "tool":
            first = (m.get("content") or "").strip().splitlines()[:1]
            lines.append(f"  → {first[0][:120] if first else '(empty)'}")
    return "Summary of earlier steps (trimmed to fit the context):\n" + "\n".join(lines)


def fit(
    msgs: list[Message],
    count: Callable[[list[Message]], int],
    limit: int,
    *,
    summarize_dropped: bool = False,
) -> list[Message]:
    """The messages, trimmed (policy trim) until `count(messages) <= limit`; raises
    ContextOverflow where that is impossible."""
    counter = Counter(lambda m, _tools: count(m))
    note_for = (lambda d, _n: summarize(d)) if summarize_dropped else None
    out, _ = compact(msgs, counter, limit, MemoryConfig(low_water=1.0), note_for=note_for)
    return out


def counter(
    count_tokens: Callable[[list[Message], list[dict[str, Any]]], int], tools: list[dict[str, Any]]
) -> Callable[[list[Message]], int]:
    return lambda msgs: count_tokens(msgs, tools)
