"""A backend that replays a script of turns: the fake model for kernel tests, demos and crash
tests. Which turn it plays is derived from the request (the number of assistant messages in
it), never from hidden state, so a resumed process gets the turn it would have got."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmos.backends.base import ChatRequest, ChatResult, Message, ToolCall, Usage

Turn = dict[str, Any]  # {"content", "tool_calls": [{"name", "arguments"}], "call_delays", ...}


def call(name: str, **arguments: Any) -> dict[str, Any]:
    """A tool call entry for a script: `call("read_file", path="a.txt")`."""
    return {"name": name, "arguments": arguments}


class ScriptedBackend:
    kind = "scripted"
    context_window: int | None = 4096

    def __init__(
        self, turns: list[Turn] | Callable[[ChatRequest], Turn], *, name: str = "scripted"
    ) -> None:
        self.turns = turns
        self.name = name
        self.requests: list[ChatRequest] = []

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedBackend:
        return cls(json.loads(Path(path).read_text()), name=f"scripted:{Path(path).name}")

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]]) -> int:
        return sum(len(str(m.get("content") or m.get("raw") or "").split()) + 4 for m in messages)

    def _turn(self, request: ChatRequest) -> Turn:
        if callable(self.turns):
            return self.turns(request)
        index = sum(1 for m in request.messages if m["role"] == "assistant")
        if index >= len(self.turns):
            return {"content": "(the script has ended)"}
        return self.turns[index]

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        turn = self._turn(request)
        if turn.get("delay"):
            await asyncio.sleep(turn["delay"])
        if turn.get("raise"):
            raise RuntimeError(turn["raise"])
        calls = [
            ToolCall(
                c.get("id") or f"call_{uuid.uuid4().hex[:8]}",
                c["name"],
                c["arguments"] if isinstance(c["arguments"], str) else json.dumps(c["arguments"]),
            )
            for c in turn.get("tool_calls", [])
        ]
        # "call_delays": seconds the model "writes" each call (one more entry: the rest of the
        # turn); a streaming caller hears of each call as it is complete
        delays = [float(d) for d in turn.get("call_delays", [])]
        for i, c in enumerate(calls):
            if i < len(delays):
                await asyncio.sleep(delays[i])
            if request.on_tool_call is not None:
                request.on_tool_call(i, c)
        if len(delays) > len(calls):
            await asyncio.sleep(delays[len(calls)])
        prompt = self.count_tokens(request.messages, request.tools)
        u = turn.get("usage", {})
        usage = Usage(
            u.get("prompt_tokens", prompt),
            u.get("cached_tokens", 0),
            u.get("completion_tokens", 10),
        )
        content = turn.get("content")
        raw = content or "\n".join(
            json.dumps({"name": c.name, "arguments": json.loads(c.arguments)}) for c in calls
        )
        return ChatResult(
            content,
            calls,
            usage,
            float(turn.get("engine_seconds", 0.01)),
            "tool_calls" if calls else "stop",
            raw=raw,
            malformed=turn.get("malformed"),
        )

    def release(self, key: str) -> None:
        return None  # nothing is kept between calls

    async def aclose(self) -> None:
        return None
