"""The context window as memory: the prompt is a projection of the transcript, trimmed to fit
by eliding old tool outputs first and then dropping the oldest exchanges."""

from __future__ import annotations

import json

from llmos.backends import toolprompt
from llmos.backends.base import ToolCall
from llmos.kernel import Program
from llmos.kernel.memory import fit, summarize, to_messages
from llmos.kernel.process import ErrorStep, ModelTurn, Process, ToolResultStep


def words(msgs: list[dict]) -> int:
    return sum(len(str(m.get("content") or "").split()) + 3 for m in msgs)


def conversation(n: int) -> list[dict]:
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"}]
    for i in range(n):
        call = {
            "id": f"c{i}",
            "type": "function",
            "function": {"name": "read_file", "arguments": json.dumps({"path": f"{i}"})},
        }
        msgs += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"file {i} " * 50},
        ]
    return msgs


def test_projection_of_the_transcript() -> None:
    call = ToolCall("c1", "read_file", '{"path": "a"}')
    proc = Process(
        1,
        Program(system_prompt="S", output_schema={"type": "object"}),
        "task",
        ".",
        steps=[
            ModelTurn(None, [call], raw="<tool_call>..."),
            ToolResultStep("c1", "read_file", False, "", "refused: no", "h"),
            ModelTurn("oops", [], raw="oops", malformed="cut off"),
            ErrorStep("malformed_output", "cut off"),
        ],
    )
    msgs = to_messages(proc)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert "JSON schema" in msgs[0]["content"]
    assert msgs[2]["tool_calls"][0]["id"] == "c1" and msgs[2]["raw"] == "<tool_call>..."
    assert msgs[3]["content"] == "error: refused: no"
    assert "tool_calls" not in msgs[4] and "cut off" in msgs[5]["content"]


def test_fit_elides_old_outputs_first() -> None:
    msgs = conversation(4)
    assert fit(msgs, words, 10_000) is msgs
    trimmed = fit(msgs, words, 300)
    assert words(trimmed) <= 300 and len(trimmed) == len(msgs)
    assert trimmed[3]["content"].startswith("[output elided")
    assert trimmed[-1]["content"] == msgs[-1]["content"]  # the newest output stays
    assert msgs[3]["content"].startswith("file 0")  # the transcript itself is untouched


def test_fit_drops_oldest_exchanges_with_a_note() -> None:
    msgs = conversation(8)
    dropped = fit(msgs, words, 250)
    assert words(dropped) <= 250 and "earlier messages were dropped" in dropped[2]["content"]
    assert dropped[:2] == msgs[:2] and dropped[-1] == msgs[-1]
    assert dropped[3]["role"] == "assistant"  # never a tool result without its call
    # the extractive summary is longer than the elided steps it stands for: the count instead
    short = fit(msgs, words, 250, summarize_dropped=True)
    assert words(short) <= 250 and "earlier messages were dropped" in short[2]["content"]
    note = summarize(msgs[2:4])
    assert note.startswith("Summary of earlier steps") and 'read_file({"path": "0"})' in note


def test_toolprompt_parses_calls_and_refuses_broken_ones() -> None:
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {}}}]
    assert toolprompt.parse("plain answer", tools) == ("plain answer", [])
    content, (call,) = toolprompt.parse('{"name": "read_file", "arguments": {"path": "a"}}', tools)
    assert (
        content is None and call.name == "read_file" and json.loads(call.arguments) == {"path": "a"}
    )
    for bad in (
        '{"name": "read_file", "arguments": ',
        '{"arguments": {}}',
        '{"name": "x", "arguments": [1]}',
    ):
        try:
            toolprompt.parse(bad, tools)
        except toolprompt.MalformedToolCall:
            continue
        raise AssertionError(f"accepted {bad!r}")
