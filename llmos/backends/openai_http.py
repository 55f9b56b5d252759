"""Any OpenAI-compatible server (llmos serve, vLLM, SGLang, llama.cpp, OpenAI) through the
official `openai` client. This is how the kernel uses a cluster when one machine is not enough.

`native_tools=False` renders the tools into the prompt instead, for servers whose models have
no tool calling (how most local agents run today)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from openai import AsyncOpenAI

from llmos.backends import toolprompt
from llmos.backends.base import ChatRequest, ChatResult, Message, ToolCall, Usage

_OPENAI_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}


class OpenAIHTTPBackend:
    kind = "openai_http"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "none",
        native_tools: bool = True,
        enforces_schema: bool = False,
        send_priority: bool = False,
        context_window: int | None = None,
        timeout: float = 600.0,
        extra_body: dict[str, Any] | Callable[[ChatRequest], dict[str, Any]] | None = None,
    ) -> None:
        self.client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2
        )
        self.model = model
        self.native_tools = native_tools
        # True for a server known to decode tool arguments under their schema (llmos serve,
        # vLLM with guided decoding): the kernel then sends long enums too.
        self.enforces_schema = enforces_schema
        self.send_priority = send_priority  # vLLM and llmos read `priority`; others may not
        self.name = f"openai_http:{model}@{base_url}"
        self.context_window = context_window
        self.extra_body = extra_body  # server-specific fields (a grammar, guided decoding...)

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]]) -> int:
        """An estimate (about 4 characters a token): the server's tokenizer is not here."""
        return len(json.dumps(messages)) // 4 + len(json.dumps(tools)) // 4

    async def chat(self, request: ChatRequest) -> ChatResult:
        native = self.native_tools and bool(request.tools)
        if native:
            messages = [
                {k: v for k, v in m.items() if k in _OPENAI_MESSAGE_KEYS} for m in request.messages
            ]
        else:
            messages = toolprompt.render(request.messages, request.tools, request.tool_choice)
        kwargs: dict[str, Any] = dict(request.sampling)
        if native:
            kwargs.update(tools=request.tools, tool_choice=request.tool_choice)
        if request.user:
            kwargs["user"] = request.user
        extra = (
            self.extra_body(request) if callable(self.extra_body) else dict(self.extra_body or {})
        )
        if self.send_priority:
            extra["priority"] = request.priority
        if extra:
            kwargs["extra_body"] = extra
        t0 = time.monotonic()
        if native and request.on_tool_call is not None:  # calls handed over as they complete
            return await self._streamed(request, messages, kwargs, t0)
        reply = await self.client.chat.completions.create(
            model=self.model, messages=messages, **kwargs
        )
        seconds = time.monotonic() - t0
        choice = reply.choices[0]
        u = reply.usage
        details = getattr(u, "prompt_tokens_details", None) if u else None
        usage = Usage(
            u.prompt_tokens if u else 0,
            (getattr(details, "cached_tokens", None) or 0) if details else 0,
            u.completion_tokens if u else 0,
        )
        text = choice.message.content or ""
        result = ChatResult(text or None, [], usage, seconds, choice.finish_reason, raw=text)
        if native:
            result.tool_calls = [
                ToolCall(c.id, c.function.name, c.function.arguments or "{}")
                for c in choice.message.tool_calls or []
            ]
            return result
        return toolprompt.read_reply(result, request)

    async def _streamed(
        self, request: ChatRequest, messages: list[Message], kwargs: dict[str, Any], t0: float
    ) -> ChatResult:
        """The same call streamed: each tool call goes to `request.on_tool_call` once its
        arguments are a complete JSON object or the next call starts, as vLLM streams them."""
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
        text, finish, usage = "", None, Usage()
        calls: list[dict[str, str]] = []
        handed = 0
        first: float | None = None
        async for chunk in stream:
            if chunk.usage is not None:
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                usage = Usage(
                    chunk.usage.prompt_tokens,
                    (getattr(details, "cached_tokens", None) or 0) if details else 0,
                    chunk.usage.completion_tokens,
                )
            for choice in chunk.choices:
                first = first if first is not None else time.monotonic() - t0
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
                for d in choice.delta.tool_calls or []:
                    while len(calls) <= d.index:
                        calls.append({"id": "", "name": "", "arguments": ""})
                    c = calls[d.index]
                    c["id"] = d.id or c["id"]
                    if d.function is not None:
                        c["name"] += d.function.name or ""
                        c["arguments"] += d.function.arguments or ""
            while handed < len(calls) and (handed < len(calls) - 1 or _complete(calls[handed])):
                c = calls[handed]
                request.on_tool_call(handed, ToolCall(c["id"], c["name"], c["arguments"]))
                handed += 1
        result = ChatResult(text or None, [], usage, time.monotonic() - t0, finish, raw=text)
        result.first_chunk_seconds = first
        result.tool_calls = [ToolCall(c["id"], c["name"], c["arguments"] or "{}") for c in calls]
        for i in range(handed, len(calls)):
            request.on_tool_call(i, result.tool_calls[i])
        return result

    def release(self, key: str) -> None:
        return None  # nothing is kept between calls

    async def aclose(self) -> None:
        await self.client.close()


def _complete(call: dict[str, str]) -> bool:
    """Are a streamed call's arguments a whole JSON object yet?"""
    try:
        return isinstance(json.loads(call["arguments"] or "x"), dict)
    except json.JSONDecodeError:
        return False
