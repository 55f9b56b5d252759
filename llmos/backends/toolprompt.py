"""Tools for models and servers without native tool calling: the tool list goes into the
system prompt, and a JSON object in the reply is read back as a tool call.

The format is the one documented for SmolLM2-like templates: the model answers with only
`{"name": "<tool>", "arguments": {...}}` to call a tool, or with plain text to finish.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from llmos.backends.base import ChatRequest, ChatResult, Message, ToolCall
from llmos.models.messages import normalize

INSTRUCTIONS = (
    "You can call tools. To call one, reply with only a JSON object, nothing else:\n"
    '{"name": "<tool name>", "arguments": {<arguments>}}\n'
    "You will get its result in the next message. When you know the answer, reply with "
    "plain text (not JSON).\nTools:\n"
)


class MalformedToolCall(ValueError):
    """The reply looks like a tool call but cannot be read as one; the message says why."""


def describe(tools: list[dict[str, Any]]) -> str:
    lines = []
    for t in tools:
        fn = t.get("function", t)
        params = fn.get("parameters", {}).get("properties", {})
        args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in params.items())
        lines.append(f"- {fn['name']}({args}): {fn.get('description', '').strip()}")
    return "\n".join(lines)


def render(
    messages: list[Message], tools: list[dict[str, Any]], tool_choice: str | dict[str, Any]
) -> list[Message]:
    """Messages with only string contents and the roles every chat template knows."""
    messages = normalize(messages)
    out: list[Message] = []
    if tools and tool_choice != "none":
        block = INSTRUCTIONS + describe(tools)
        if isinstance(tool_choice, dict):
            block += f"\nCall the tool {tool_choice['function']['name']} now."
        elif tool_choice == "required":
            block += "\nCall one of the tools now."
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            content = m.get("raw") or "\n".join(
                json.dumps(
                    {
                        "name": c["function"]["name"],
                        "arguments": json.loads(c["function"]["arguments"] or "{}"),
                    }
                )
                for c in m["tool_calls"]
            )
            out.append({"role": "assistant", "content": content})
        elif role == "assistant":
            out.append({"role": "assistant", "content": m.get("raw") or m.get("content") or ""})
        elif role == "tool":  # as a user turn: servers without tool calling refuse `tool`
            out.append(
                {
                    "role": "user",
                    "content": f"Result of {m.get('name') or 'the tool'}:\n"
                    f"{m.get('content') or ''}",
                }
            )
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    return out


def parse(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[ToolCall]]:
    """Plain text → (text, []); a JSON tool call → (None, [call]). Raises MalformedToolCall."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    if not tools or not stripped.startswith(("{", "[")):
        return text, []
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        try:  # a complete object followed by chatter is still a call
            value, _ = json.JSONDecoder().raw_decode(stripped)
        except json.JSONDecodeError:
            raise MalformedToolCall(
                f"the reply starts like a JSON tool call but is not valid "
                f"JSON ({exc.msg} at character {exc.pos})"
            ) from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name", c.get("tool")), str):
            raise MalformedToolCall('a tool call must be an object with a string "name"')
        args = c.get("arguments", c.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise MalformedToolCall('"arguments" must be a JSON object') from None
        if not isinstance(args, dict):
            raise MalformedToolCall('"arguments" must be a JSON object')
        out.append(
            ToolCall(
                f"call_{uuid.uuid4().hex[:12]}", c.get("name", c.get("tool")), json.dumps(args)
            )
        )
    return None, out


def read_reply(result: ChatResult, request: ChatRequest) -> ChatResult:
    """Fill `result`'s tool calls from its text, or say why the text cannot be read."""
    if request.tools and request.tool_choice != "none":
        try:
            result.content, result.tool_calls = parse(result.raw, request.tools)
        except MalformedToolCall as exc:
            result.malformed = str(exc)
    return result
