"""The engine in-process. Many processes' calls go through one `AsyncEngine`, so the engine
batches them; each call carries its process's priority and owner as the request's `priority`
and `user`, so the engine's fair scheduling applies to processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from llmos.backends import toolprompt
from llmos.backends.base import ChatRequest, ChatResult, Message, Usage
from llmos.engine.async_engine import AsyncEngine
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import RequestOutput

DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 0.0, "max_tokens": 256}


class LocalBackend:
    kind = "local"

    def __init__(self, engine: LLMEngine | AsyncEngine | None = None, **engine_options: Any):
        owns = not isinstance(engine, AsyncEngine)
        if engine is None:
            engine = LLMEngine(**engine_options)
        self.engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
        self._owns = owns
        self.engine.start()
        llm = self.engine.engine
        self.name = f"local:{llm.model_name}"
        self.context_window: int | None = llm.max_model_len
        self._seconds: dict[str, float] = {}
        self._last_step = time.monotonic()
        self.engine.step_listeners.append(self._on_step)

    def _on_step(self, outputs: list[RequestOutput]) -> None:
        """Share each step's wall time among the requests it advanced (engine thread)."""
        now = time.monotonic()
        dt, self._last_step = now - self._last_step, now
        ours = [o.request_id for o in outputs if o.request_id in self._seconds]
        for rid in ours:
            self._seconds[rid] += dt / max(1, len(outputs))

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]]) -> int:
        rendered = toolprompt.render(messages, tools, "auto")
        return len(self.engine.tokenizer.encode_chat(rendered))

    async def chat(self, request: ChatRequest) -> ChatResult:
        messages = toolprompt.render(request.messages, request.tools, request.tool_choice)
        prompt = self.engine.tokenizer.encode_chat(messages)
        params = SamplingParams(**{**DEFAULT_SAMPLING, **request.sampling})
        rid = request.request_id or uuid.uuid4().hex
        if self.engine.num_in_flight == 0:
            self._last_step = time.monotonic()  # the engine was idle until now
        self._seconds[rid] = 0.0
        final: RequestOutput | None = None
        try:
            async for out in self.engine.generate(prompt, params, request_id=rid,
                                                  priority=request.priority, user=request.user):
                final = out
        finally:
            seconds = self._seconds.pop(rid, 0.0)
        assert final is not None and final.finished
        text = final.text
        usage = Usage(len(final.prompt_token_ids), final.num_cached_tokens, len(final.token_ids))
        return toolprompt.read_reply(
            ChatResult(text, [], usage, seconds, final.finish_reason, raw=text), request)

    async def aclose(self) -> None:
        self.engine.step_listeners.remove(self._on_step)
        if self._owns:
            await asyncio.to_thread(self.engine.shutdown)
