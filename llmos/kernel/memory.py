"""The context window as memory. The prompt is a projection of the transcript (`to_messages`);
when it would not fit, `fit` first elides old tool outputs, then drops the oldest exchanges,
leaving a note or a compact summary of what was dropped. Token counts are the backend's own
(the local engine's tokenizer), so "fits" means fits."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from llmos.backends.base import Message
from llmos.kernel.process import ErrorStep, ModelTurn, Process, ToolResultStep

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


def system_prompt(proc: Process) -> str:
    text = proc.program.system_prompt
    if proc.program.output_schema is not None:
        text += (
            "\n\nYour final answer must be only a JSON value that matches this JSON "
            f"schema:\n{json.dumps(proc.program.output_schema)}"
        )
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


def _exchanges(msgs: list[Message]) -> list[list[Message]]:
    """Group the conversation (after system + input) into assistant-led exchanges."""
    groups: list[list[Message]] = []
    for m in msgs:
        if m["role"] == "assistant" or not groups:
            groups.append([m])
        else:
            groups[-1].append(m)
    return groups


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
    """The messages, trimmed until `count(messages) <= limit` where that is possible."""
    if count(msgs) <= limit:
        return msgs
    head, body = msgs[:2], [dict(m) for m in msgs[2:]]
    cut = max(0, len(body) - KEEP_RECENT)
    for m in body[:cut]:  # 1: elide old tool outputs, oldest first
        if m["role"] == "tool" and len(m.get("content") or "") > 80:
            m["content"] = f"[output elided to save context: {len(m['content'])} characters]"
            if count(head + body) <= limit:
                return head + body
    groups = _exchanges(body)
    dropped: list[Message] = []
    trial = head + body
    while len(groups) > 1 and sum(map(len, groups[1:])) >= KEEP_RECENT - 1:  # 2: drop oldest
        dropped += groups.pop(0)
        note = (
            summarize(dropped)
            if summarize_dropped
            else f"[{len(dropped)} earlier messages were dropped to fit the context]"
        )
        trial = head + [{"role": "user", "content": note}] + [m for g in groups for m in g]
        if count(trial) <= limit:
            break
    return trial  # the best it can do: the newest messages are kept whole


def counter(
    count_tokens: Callable[[list[Message], list[dict[str, Any]]], int], tools: list[dict[str, Any]]
) -> Callable[[list[Message]], int]:
    return lambda msgs: count_tokens(msgs, tools)
