"""What `/v1/responses` answers: output items, usage, and the Response object, built as plain
dicts in OpenAI's shape (the official client's types read them)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from llmos.engine.sequence import CompletionOutput, RequestOutput
from llmos.server.responses_protocol import ResponsesRequest


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str, item_id: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def call_item(
    call_id: str, name: str, arguments: str, item_id: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(o: CompletionOutput) -> list[dict[str, Any]]:
    """A finished choice (its tool calls parsed) as output items."""
    status = "incomplete" if o.finish_reason in ("length", "content_filter") else "completed"
    items = [message_item(o.text, new_id("msg"), status)] if o.text or not o.tool_calls else []
    for c in o.tool_calls or []:
        items.append(call_item(c.id, c.function.name, c.function.arguments, new_id("fc")))
    return items


def usage(out: RequestOutput) -> dict[str, Any]:
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": out.num_cached_tokens, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def response_body(
    rid: str,
    req: ResponsesRequest,
    model: str,
    *,
    status: str,
    output: list[dict[str, Any]] | None = None,
    out: RequestOutput | None = None,
    created_at: int | None = None,
) -> dict[str, Any]:
    """The Response object; `out` (the finished engine output) gives usage and status detail."""
    reason = out.outputs[0].finish_reason if out is not None else None
    length = reason in ("length", "content_filter")  # (an output guard stopped it)
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at or int(time.time()),
        "status": "incomplete" if length else status,
        "completed_at": int(time.time()) if out is not None else None,
        "error": None,
        "incomplete_details": (
            {"reason": "max_output_tokens" if reason == "length" else reason} if length else None
        ),
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "model": model,
        "output": output or [],
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": None,
        "store": req.store,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": (req.text.format if req.text else None) or {"type": "text"}},
        "tool_choice": req.tool_choice or "auto",
        "tools": req.function_tools or [],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "usage": usage(out) if out is not None else None,
        "user": req.user,
    }
