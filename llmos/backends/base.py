"""The one protocol every backend speaks: a chat-shaped call in, an assistant turn out.

Messages and tools are in OpenAI's format, so the kernel's transcript maps onto any
OpenAI-compatible server unchanged, and the local engine answers the same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]


@dataclass(slots=True, frozen=True)
class ToolCall:
    """One call the model asked for; `arguments` is the JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those served from a (prefix) cache
    completion_tokens: int = 0


@dataclass(slots=True)
class ChatRequest:
    messages: list[Message]
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI `tools` entries
    tool_choice: str | dict[str, Any] = "auto"
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, max_tokens, seed...
    priority: int = 0  # higher runs first (and may preempt lower), as in the engine
    user: str | None = None
    request_id: str | None = None
    # A key (the process) under which the backend may keep this conversation's KV cache after
    # the call, for the next turn; `release(key)` lets it go. Backends without one ignore it.
    retain: str | None = None
    # Called with (index, call) as each tool call's arguments are complete in the stream, while
    # the model may still be writing the next (the kernel starts read-only calls then). Backends
    # that do not stream ignore it; the result's `tool_calls` stay the authority.
    on_tool_call: Callable[[int, ToolCall], None] | None = field(default=None, compare=False)


@dataclass(slots=True)
class ChatResult:
    content: str | None
    tool_calls: list[ToolCall]
    usage: Usage
    engine_seconds: float  # what the call cost the serving machine (local: its share of steps)
    finish_reason: str | None = None
    raw: str = ""  # the text exactly as generated, so the next prompt reuses its cached tokens
    malformed: str | None = None  # why the reply could not be read (the loop asks for a repair)
    logprobs: list[float] | None = None  # the chosen tokens' log-probs, when sampling asks
    backend: str | None = None  # the backend that answered (a pool's member); None: this one
    first_chunk_seconds: float | None = None  # call to first token, where the backend knows it


@runtime_checkable
class Backend(Protocol):
    name: str  # "local:smollm2-135m", "openai_http:MODEL@URL", ... (the meter's model key)
    kind: str  # the price table's key: "local", "openai_http", "scripted"
    context_window: int | None  # tokens, when known
    # Optional `enforces_schema: bool`: True where tool-call arguments are decoded under their
    # schema (a long enum is then safe to send); the kernel reads it with getattr, default False.

    async def chat(self, request: ChatRequest) -> ChatResult: ...

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]]) -> int: ...

    def release(self, key: str) -> None:
        """Let go of what `ChatRequest.retain` kept under `key` (no-op where nothing is kept)."""
        ...

    async def aclose(self) -> None: ...
