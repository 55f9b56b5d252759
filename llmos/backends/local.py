"""The engine in-process. Many processes' calls go through one `AsyncEngine`, so the engine
batches them; each call carries its process's priority and owner as the request's `priority`
and `user`, so the engine's fair scheduling applies to processes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from llmos.backends.base import ChatRequest, ChatResult, Message, ToolCall, Usage
from llmos.engine.async_engine import AsyncEngine
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import RequestOutput

try:  # grammar-constrained tool calls (the structured-output engine work)
    from llmos.engine.tool_calls import OPEN, prepare_chat, scan_calls
except ImportError:  # pragma: no cover - an engine without them: tools go in the prompt
    prepare_chat = None

DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 0.0, "max_tokens": 256}


class LocalBackend:
    kind = "local"
    enforces_schema = True  # tool arguments are decoded under their JSON schema's grammar

    def __init__(self, engine: LLMEngine | AsyncEngine | None = None, **engine_options: Any):
        owns = not isinstance(engine, AsyncEngine)
        if engine is None:  # built on the engine thread (see AsyncEngine)
            self.engine = AsyncEngine(lambda: LLMEngine(**engine_options))
        else:
            self.engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
        self._owns = owns
        self.engine.start()
        llm = self.engine.engine
        self.name = f"local:{llm.model_name}"
        self.context_window: int | None = llm.max_model_len

    def _prompt(self, request: ChatRequest, params: SamplingParams) -> tuple[list[int], Any]:
        """Token ids, and the engine's tool-call grammar (None when the model may not call)."""
        tok = self.engine.tokenizer
        # A past call goes back as the exact text the model wrote, so its KV blocks match.
        msgs = [
            {"role": m["role"], "content": m["raw"]}
            if m.get("raw")
            else {k: v for k, v in m.items() if k != "raw"}
            for m in request.messages
        ]
        rendered, kwargs, calls = prepare_chat(
            tok, msgs, request.tools or None, request.tool_choice
        )
        return tok.encode_chat(rendered, **kwargs), calls

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]]) -> int:
        request = ChatRequest(messages, tools)
        return len(self._prompt(request, SamplingParams())[0])

    async def chat(self, request: ChatRequest) -> ChatResult:
        params = SamplingParams(**{**DEFAULT_SAMPLING, **request.sampling})
        prompt, calls = self._prompt(request, params)
        if calls is not None:
            params = calls.constrain(params)
        rid = request.request_id or uuid.uuid4().hex
        final: RequestOutput | None = None
        streamed = 0  # tool calls handed to request.on_tool_call so far
        async for out in self.engine.generate(
            prompt,
            params,
            request_id=rid,
            priority=request.priority,
            user=request.user,
            retain=request.retain,
        ):
            final = out
            if request.on_tool_call is not None and calls is not None:
                streamed = _stream_calls(out.outputs[0].text, streamed, request.on_tool_call)
        assert final is not None and final.finished
        out = final.outputs[0]
        raw = out.text
        usage = Usage(len(final.prompt_token_ids), final.num_cached_tokens, len(out.token_ids))
        seconds = final.metrics.get("engine_seconds", 0.0)  # its share of the engine's steps
        result = ChatResult(raw, [], usage, seconds, out.finish_reason, raw=raw)
        if "first_token" in final.metrics:  # for the trace's time_to_first_chunk
            result.first_chunk_seconds = final.metrics["first_token"] - final.metrics["arrival"]
        if out.logprobs is not None:  # sampling asked: the chosen tokens' own log-probs
            result.logprobs = [t.logprob for t in out.logprobs]
        if calls is not None:
            calls.finish(out)
            result.finish_reason = out.finish_reason
            if out.tool_calls:
                result.content = out.text or None
                result.tool_calls = [
                    ToolCall(c.id, c.function.name, c.function.arguments) for c in out.tool_calls
                ]
            elif out.finish_reason == "length" and raw.lstrip().startswith("<tool_call>"):
                result.malformed = "the tool call was cut off by max_tokens"
        return result

    def release(self, key: str) -> None:
        self.engine.release(key)

    async def aclose(self) -> None:
        if self._owns:
            await asyncio.to_thread(self.engine.shutdown)


def _stream_calls(text: str, done: int, on_call: Any) -> int:
    """Hand each tool call whose arguments are now complete to `on_call`, once; returns how
    many have been handed over."""
    if not text.startswith(OPEN):
        return done
    calls = [c for c in scan_calls(text[len(OPEN) :]) if c.done]
    for i in range(done, len(calls)):
        on_call(i, ToolCall(f"stream_{i}", calls[i].name, calls[i].arguments))
    return max(done, len(calls))
