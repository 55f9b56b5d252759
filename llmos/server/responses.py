"""`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`: OpenAI's Responses API.

A request is translated into the chat completion it amounts to (see `responses_protocol`) and
runs through the same prompt, tool grammar and engine path, so a response continued by
`previous_response_id` renders the same prefix as before and reuses its KV blocks through the
prefix cache (`usage.input_tokens_details.cached_tokens`).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from llmos.engine.sequence import RequestOutput
from llmos.server import fields
from llmos.server.chat import prompt_ids
from llmos.server.errors import APIError
from llmos.server.generation import Generation, PromptJob, collect
from llmos.server.response_store import ResponseStore
from llmos.server.responses_output import new_id, output_items, response_body
from llmos.server.responses_protocol import ResponseDeleted, ResponsesRequest, renamed
from llmos.server.responses_stream import ResponseEvents, stream_response
from llmos.server.state import ServerState


def not_found(response_id: str, param: str | None = None) -> APIError:
    what = "Previous response" if param else "Response"
    return APIError(
        404, f"{what} with id '{response_id}' not found.", param=param, code="not_found"
    )


async def create_response(state: ServerState, store: ResponseStore, request: Request) -> Response:
    req = ResponsesRequest.model_validate_json(await request.body())
    headers = fields.check(request, req, strict=state.config.strict_fields)
    state.check_model(req.model)
    req.check()
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise not_found(req.previous_response_id, "previous_response_id")
        history = previous.history()
    chat = req.chat_request(history)
    with renamed():
        ids, calls = prompt_ids(state, chat)
        params = chat.sampling_params(max_tokens=chat.requested_max_tokens, logprobs=None)
        if calls is not None:
            params = calls.constrain(params)
    rid = new_id("resp")
    created_at = int(time.time())
    with renamed():
        gen = await Generation.start(
            state,
            request,
            [PromptJob(ids, params)],
            request_id=rid,
            priority=req.priority,
            user=req.user,
        )
    input_items = [*history, *map(_with_id, req.input_items())]

    def save(body: dict[str, Any]) -> None:
        if req.store:
            store.put(body, input_items)

    def finish(out: RequestOutput) -> dict[str, Any]:
        return response_body(
            rid, req, state.model_name, status="completed", out=out, created_at=created_at
        )

    response_headers = {"x-request-id": rid, **headers}
    if req.stream:
        started = response_body(
            rid, req, state.model_name, status="in_progress", created_at=created_at
        )
        render = ResponseEvents(started, tools=calls is not None)
        return stream_response(state, gen, render, finish, save, rid, headers)
    (out,) = await collect(request, gen)
    if calls is not None:
        calls.finish(out.outputs[0])
    body = finish(out)
    body["output"] = output_items(out.outputs[0])
    save(body)
    state.metrics.count(200)
    return JSONResponse(body, headers=response_headers)


def retrieve_response(state: ServerState, store: ResponseStore, response_id: str) -> Response:
    stored = store.get(response_id)
    if stored is None:
        raise not_found(response_id)
    state.metrics.count(200)
    return JSONResponse(stored.response)


def list_input_items(
    state: ServerState,
    store: ResponseStore,
    response_id: str,
    *,
    limit: int = 20,
    order: str = "desc",
    after: str | None = None,
) -> Response:
    """The conversation's input items (earlier turns' too), a cursor page as OpenAI's."""
    stored = store.get(response_id)
    if stored is None:
        raise not_found(response_id)
    if not 1 <= limit <= 100:
        raise APIError(400, f"limit must be in [1, 100], got {limit}", param="limit")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
    items = stored.input if order == "asc" else stored.input[::-1]
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise APIError(400, f"after: no item {after!r} in this response", param="after")
        items = items[ids.index(after) + 1 :]
    page = [_parts(item) for item in items[:limit]]
    state.metrics.count(200)
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _with_id(item: Any) -> Any:
    """An input item with an id (the client may leave it out), so it can be listed."""
    if not isinstance(item, dict) or item.get("id"):
        return item
    kind = item.get("type", "message")
    return {"type": kind, **item, "id": new_id(_PREFIX.get(kind, "item"))}


def _parts(item: dict[str, Any]) -> dict[str, Any]:
    """A message item's text content as a list of parts, as OpenAI lists it."""
    if item.get("type") != "message" or not isinstance(item.get("content"), str):
        return item
    kind = "output_text" if item.get("role") == "assistant" else "input_text"
    return {**item, "content": [{"type": kind, "text": item["content"]}]}


def delete_response(state: ServerState, store: ResponseStore, response_id: str) -> Response:
    if not store.delete(response_id):
        raise not_found(response_id)
    state.metrics.count(200)
    return JSONResponse(ResponseDeleted(id=response_id).model_dump())
