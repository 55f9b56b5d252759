"""`POST /v1/chat/completions`: messages through the chat template, answers as OpenAI's."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jinja2
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from llmos.engine.sequence import CompletionOutput, RequestOutput
from llmos.engine.tool_calls import ChatTools, prepare_chat
from llmos.server import chat_trim, fields
from llmos.server.errors import APIError
from llmos.server.generation import Generation, PromptJob, collect
from llmos.server.logprobs import TokenTexts, chat_logprobs
from llmos.server.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Usage,
)
from llmos.server.state import ServerState
from llmos.server.streaming import Deltas, ToolCallStream, event, sse_response, usage_of


def prompt_ids(
    state: ServerState, req: ChatCompletionRequest, trimmed: dict[str, Any] | None = None
) -> tuple[list[int], ChatTools | None]:
    """The prompt, with tools and past calls rendered; and the tools the reply may call. With
    `--trim-history` and a `trimmed` dict to fill, a history too long is trimmed to fit."""
    tokenizer = state.engine.tokenizer
    history = [m.for_template() for m in req.messages]
    if trimmed is not None and state.config.trim_history:
        history, done = chat_trim.trim(state, req, history)
        trimmed.update(done or {})
    messages, kwargs, calls = prepare_chat(
        tokenizer,
        history,
        req.tools,
        req.tool_choice,
        req.parallel_tool_calls,
    )
    state.check_text_fits(sum(len(m["content"]) for m in messages), "messages")
    try:
        ids = tokenizer.encode_chat(
            messages, add_generation_prompt=req.add_generation_prompt, **kwargs
        )
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise APIError(
            400, f"messages: the chat template cannot render them: {exc}", param="messages"
        ) from exc
    return ids, calls


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = ChatCompletionRequest.model_validate_json(await request.body())
    headers = fields.check(request, req, strict=state.config.strict_fields)
    state.check_model(req.model)
    req.check()
    trimmed: dict[str, Any] = {}
    ids, calls = prompt_ids(state, req, trimmed)
    # None: the engine gives the room left in the context and the KV cache
    params = req.sampling_params(max_tokens=req.requested_max_tokens, logprobs=req.num_logprobs)
    if calls is not None:
        params = calls.constrain(params)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    gen = await Generation.start(
        state,
        request,
        [PromptJob(ids, params)],
        request_id=rid,
        priority=req.priority,
        user=req.user,
    )
    if req.stream:
        stream = ChatStream(state, rid, req, calls is not None)
        stream.trimmed = trimmed or None
        return sse_response(state, gen, stream, rid, headers)
    (out,) = await collect(request, gen)
    usage = usage_of([out])
    if trimmed:  # --trim-history cut the history: say so
        usage.context_trim = trimmed  # type: ignore[attr-defined]
    body = ChatCompletion(
        id=rid,
        model=state.model_name,
        usage=usage,
        choices=[_choice(o, state.texts, req.logprobs, calls) for o in out.outputs],
    )
    state.metrics.count(200)
    return JSONResponse(body.model_dump(), headers={"x-request-id": rid, **headers})


def _choice(
    o: CompletionOutput, texts: TokenTexts, logprobs: bool, calls: ChatTools | None
) -> ChatChoice:
    if calls is not None:
        calls.finish(o)
    message = (
        ChatMessageOut(content=o.text, tool_calls=None)
        if not o.tool_calls
        else ChatMessageOut(content=o.text or None, tool_calls=[c.to_dict() for c in o.tool_calls])
    )
    return ChatChoice(
        index=o.index,
        message=message,
        finish_reason=o.finish_reason,
        logprobs=chat_logprobs(o.logprobs or [], texts) if logprobs else None,
    )


class ChatStream:
    """Chunks as OpenAI sends them: a role delta per choice first, content deltas, then a
    finish reason, and a usage chunk when `stream_options.include_usage` asks for it."""

    def __init__(
        self, state: ServerState, rid: str, req: ChatCompletionRequest, tools: bool = False
    ) -> None:
        self.texts = state.texts
        self.tools: dict[int, ToolCallStream] | None = {} if tools else None
        self.n = req.n
        self.logprobs = req.logprobs
        self.include_usage = req.include_usage
        self.deltas = Deltas(req.n)
        self.base = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": state.model_name,
        }
        if self.include_usage:
            self.base["usage"] = None
        self.trimmed: dict[str, Any] | None = None  # what --trim-history did, for the usage

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: object = None,
        finish_reason: str | None = None,
    ) -> str:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return event({**self.base, "choices": [choice]})

    def head(self) -> str:
        return "".join(self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n))

    def update(self, prompt_index: int, out: RequestOutput) -> str:
        chunks = []
        for d in self.deltas(prompt_index, out):
            if not d.text and not d.logprobs and d.finish_reason is None:
                continue
            logprobs = (
                chat_logprobs(d.logprobs or [], self.texts).model_dump() if self.logprobs else None
            )
            delta, finish_reason = self._delta(d.index, d.text, d.finish_reason)
            if delta or logprobs or finish_reason is not None:
                chunks.append(self._chunk(d.index, delta, logprobs, finish_reason))
        return "".join(chunks)

    def _delta(
        self, index: int, text: str, finish_reason: str | None
    ) -> tuple[dict[str, Any], str | None]:
        """A choice's delta, as content or as tool calls, and its finish reason."""
        if self.tools is None:
            return ({"content": text} if text else {}), finish_reason
        stream = self.tools.setdefault(index, ToolCallStream())
        content, calls = stream.feed(text, final=finish_reason is not None)
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = calls
        if finish_reason == "stop" and stream.called:
            finish_reason = "tool_calls"
        return delta, finish_reason

    def tail(self, usage: Usage) -> str:
        if not self.include_usage:
            return ""
        if self.trimmed:
            usage.context_trim = self.trimmed  # type: ignore[attr-defined]
        return event({**self.base, "choices": [], "usage": usage.model_dump()})
