"""`POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API.

A request is translated into the chat completion it means (messages_protocol.py) and then goes
the chat route's way: the same prompt (template, tool prompt), the same sampling params and tool
grammar, the same `Generation`. Only the answer's shape differs: content blocks (`text`,
`tool_use`), a `stop_reason`, usage with `cache_read_input_tokens` from the prefix cache, and
Anthropic's event stream (message_start, content_block_*, message_delta, message_stop, ping).

Usage follows Anthropic's accounting: `input_tokens` are the prompt tokens computed for this
request, `cache_read_input_tokens` those found in the prefix cache; their sum is the prompt.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from llmos.engine.sequence import CompletionOutput, RequestOutput
from llmos.engine.tool_calls import OPEN, CallProgress, ChatTools, prepare_chat, scan_calls
from llmos.errors import RequestError
from llmos.server import fields
from llmos.server.chat import prompt_ids as chat_prompt_ids
from llmos.server.errors import APIError, ClientDisconnected, from_validation
from llmos.server.generation import Generation, PromptJob, as_api_error, collect
from llmos.server.messages_protocol import (
    STOP_REASONS,
    MessagesRequest,
    error_event,
    error_response,
    renamed,
)
from llmos.server.protocol import ChatCompletionRequest
from llmos.server.state import ServerState
from llmos.server.streaming import Deltas, ToolCallStream

log = logging.getLogger(__name__)


async def create_message(state: ServerState, request: Request) -> Response:
    headers: dict[str, str] = {}
    try:
        req, headers = _read(state, request, await request.body())
        req.check()
        state.check_model(req.model)
        chat, prefill = req.to_chat()
        chat.check()
        ids, calls = prompt_ids(state, chat, prefill)
        params = chat.sampling_params(max_tokens=req.max_tokens, logprobs=None)
        if calls is not None:
            params = calls.constrain(params)
        rid = f"msg_{uuid.uuid4().hex[:24]}"
        gen = await Generation.start(
            state, request, [PromptJob(ids, params)], request_id=rid, user=chat.user
        )
    except Exception as exc:  # noqa: BLE001 - answered in Anthropic's shape
        return _refuse(state, exc, headers)
    headers = {"request-id": rid, "x-request-id": rid, **headers}
    reply = Reply(rid, state.model_name, req.stop_sequences or [], calls)
    if req.stream:
        return StreamingResponse(
            _events(state, gen, reply),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
    try:
        (out,) = await collect(request, gen)
    except APIError as exc:
        return _refuse(state, exc, headers)
    state.metrics.count(200)
    return JSONResponse(reply.message(out), headers=headers)


async def count_tokens(state: ServerState, request: Request) -> Response:
    """The prompt's tokens, counted as `/v1/messages` would build it (tools included)."""
    headers: dict[str, str] = {}
    try:
        req, headers = _read(state, request, await request.body())
        req.check(counting=True)
        state.check_model(req.model)
        chat, prefill = req.to_chat()
        chat.check()
        ids, _ = prompt_ids(state, chat, prefill)
    except Exception as exc:  # noqa: BLE001 - answered in Anthropic's shape
        return _refuse(state, exc, headers)
    state.metrics.count(200)
    return JSONResponse({"input_tokens": len(ids)}, headers=headers)


def _read(
    state: ServerState, request: Request, body: bytes
) -> tuple[MessagesRequest, dict[str, str]]:
    req = MessagesRequest.model_validate_json(body)
    return req, fields.check(request, req, strict=state.config.strict_fields)


def _refuse(state: ServerState, exc: Exception, headers: dict[str, str]) -> Response:
    if isinstance(exc, ClientDisconnected):
        raise exc
    if isinstance(exc, ValidationError):
        err = from_validation(exc.errors())
    elif isinstance(exc, APIError | RequestError):
        err = renamed(as_api_error(exc))
    else:
        log.exception("unexpected error on /v1/messages")
        err = APIError.internal(exc)
    state.metrics.count(err.status)
    return error_response(err, headers)


def prompt_ids(
    state: ServerState, chat: ChatCompletionRequest, prefill: str | None
) -> tuple[list[int], ChatTools | None]:
    """The chat route's prompt; with a prefill, the final assistant turn is left open."""
    if prefill is None:
        return chat_prompt_ids(state, chat)
    tokenizer = state.engine.tokenizer
    messages, kwargs, calls = prepare_chat(
        tokenizer,
        [m.for_template() for m in chat.messages],
        chat.tools,
        chat.tool_choice,
        chat.parallel_tool_calls,
    )
    state.check_text_fits(sum(len(m["content"]) for m in messages), "messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise APIError(
            400, f"messages: the chat template cannot render them: {exc}", param="messages"
        ) from exc
    # as Hugging Face's continue_final_message: cut after the final message's own text
    end = text.rfind(prefill)
    assert end >= 0, "the template dropped the final assistant message"
    return tokenizer.encode(text[: end + len(prefill)], add_special_tokens=False), calls


def _cut_stop(text: str, finished_text: str, stops: list[str]) -> tuple[str, str | None]:
    """`text` (the end of `finished_text`) less the stop sequence that ended it, and that one.

    The engine keeps the stop string in the text (include_stop_str_in_output), so it can be
    named; while running it holds back that many characters, so it lies whole in `text`."""
    for stop in sorted(stops, key=len, reverse=True):
        if stop and finished_text.endswith(stop) and len(text) >= len(stop):
            return text[: -len(stop)], stop
    return text, None


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _partial_use(call: CallProgress) -> dict[str, Any]:
    """A call that max_tokens cut short, as Anthropic returns one: its input as far as it
    parses (the stream sent the same text as input_json_delta)."""
    try:
        value = json.loads(call.arguments) if call.done else None
    except json.JSONDecodeError:
        value = None
    return {
        "type": "tool_use",
        "id": _tool_id(),
        "name": call.name,
        "input": value if isinstance(value, dict) else {},
    }


def _usage(out: RequestOutput, output_tokens: int) -> dict[str, int]:
    cached = out.num_cached_tokens
    return {
        "input_tokens": len(out.prompt_token_ids) - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output_tokens,
    }


def _stop_reason(finish_reason: str | None, called: bool, stop_sequence: str | None) -> str:
    if called:
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


class Reply:
    """One request's answer in Anthropic's shape: whole, or as its event stream."""

    def __init__(self, rid: str, model: str, stops: list[str], calls: ChatTools | None) -> None:
        self.rid = rid
        self.model = model
        self.stops = stops
        self.calls = calls
        # the stream's state
        self.deltas = Deltas(1)
        self.tool_stream = ToolCallStream() if calls is not None else None
        self.blocks = 0  # content blocks started
        self.open: str | None = None  # the kind of the block still open
        self.stop_sequence: str | None = None
        self.finish_reason: str | None = None

    def _head(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
        }

    def message(self, out: RequestOutput) -> dict[str, Any]:
        o: CompletionOutput = out.outputs[0]
        o.text, stop_sequence = (
            _cut_stop(o.text, o.text, self.stops) if o.finish_reason == "stop" else (o.text, None)
        )
        content: list[dict[str, Any]] = []
        if self.calls is not None:
            self.calls.finish(o)
            if o.tool_calls is None and o.text.startswith(OPEN):  # cut off mid-call
                content = [_partial_use(c) for c in scan_calls(o.text[len(OPEN) :])]
                o.text = ""
        if o.text:
            content.append({"type": "text", "text": o.text})
        content += [
            {"type": "tool_use", "id": _tool_id(), "name": c.name, "input": c.arguments}
            for c in o.tool_calls or []
        ]
        return {
            **self._head(content),
            "stop_reason": _stop_reason(o.finish_reason, bool(o.tool_calls), stop_sequence),
            "stop_sequence": stop_sequence,
            "usage": _usage(out, len(o.token_ids)),
        }

    # -- the event stream ---------------------------------------------------------------------
    def start(self, first: RequestOutput) -> str:
        message = {
            **self._head([]),
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(first, len(first.outputs[0].token_ids)),
        }
        return sse("message_start", {"message": message}) + sse("ping", {})

    def update(self, out: RequestOutput) -> str:
        events: list[str] = []
        for d in self.deltas(0, out):
            final = d.finish_reason is not None
            text = d.text
            if final and d.finish_reason == "stop":
                text, self.stop_sequence = _cut_stop(text, out.outputs[0].text, self.stops)
            if self.tool_stream is None:
                content, calls = text, []
            else:
                content, calls = self.tool_stream.feed(text, final=final)
            if content:
                if self.open != "text":
                    events += self._start_block({"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": content}))
            for call in calls:
                if "id" in call:
                    block = {"type": "tool_use", "id": _tool_id(), "name": call["function"]["name"]}
                    events += self._start_block({**block, "input": {}})
                if call["function"].get("arguments"):
                    piece = call["function"]["arguments"]
                    events.append(self._delta({"type": "input_json_delta", "partial_json": piece}))
            if final:
                self.finish_reason = d.finish_reason
                events += self._stop_block()
        return "".join(events)

    def end(self, last: RequestOutput) -> str:
        called = self.tool_stream is not None and self.tool_stream.called
        delta = {
            "stop_reason": _stop_reason(self.finish_reason, called, self.stop_sequence),
            "stop_sequence": self.stop_sequence,
        }
        usage = {"output_tokens": len(last.outputs[0].token_ids)}
        return sse("message_delta", {"delta": delta, "usage": usage}) + sse("message_stop", {})

    def _start_block(self, block: dict[str, Any]) -> list[str]:
        events = self._stop_block()
        self.open = block["type"]
        self.blocks += 1
        start = sse("content_block_start", {"index": self.blocks - 1, "content_block": block})
        return [*events, start]

    def _stop_block(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [sse("content_block_stop", {"index": self.blocks - 1})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse("content_block_delta", {"index": self.blocks - 1, "delta": delta})


def sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n"


async def _events(state: ServerState, gen: Generation, reply: Reply) -> AsyncIterator[str]:
    status = 499  # unless the stream ends: the client left (or the server gave up on it)
    try:
        last: RequestOutput | None = None
        async for _, out in gen.outputs():
            chunk = (reply.start(out) if last is None else "") + reply.update(out)
            last = out
            if chunk:
                yield chunk
        assert last is not None  # a generation's first output comes before any other
        yield reply.end(last)
        status = 200
    except Exception as exc:  # an engine failure mid-stream: an error event, as Anthropic's
        error = as_api_error(exc)
        status = error.status
        yield error_event(error)
    finally:
        state.metrics.count(status)
        await gen.close()
