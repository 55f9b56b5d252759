"""The Responses API's typed event stream, as the official clients parse it.

`response.created` and `response.in_progress` first; then per output item `output_item.added`,
for a message `content_part.added`, `output_text.delta`s, `output_text.done` and
`content_part.done`, for a call `function_call_arguments.delta`s and `.done`; each item ends
with `output_item.done`, and the stream with `response.completed` (or `response.incomplete`
when max_output_tokens cut it). Every event carries a `sequence_number`. An engine failure
mid-stream ends it with an `error` event and `response.failed`. There is no `[DONE]` line, as
OpenAI sends none.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from llmos.engine.sequence import RequestOutput
from llmos.server.errors import APIError
from llmos.server.generation import Generation, as_api_error
from llmos.server.responses_output import call_item, message_item, new_id
from llmos.server.state import ServerState
from llmos.server.streaming import Deltas, ToolCallStream


class ResponseEvents:
    """One response's events from the engine's cumulative snapshots; `output` is its items."""

    def __init__(self, body: dict[str, Any], tools: bool) -> None:
        self.body = body  # the Response object as `response.created` shows it
        self.calls = ToolCallStream() if tools else None
        self.deltas = Deltas(1)
        self.output: list[dict[str, Any]] = []
        self._message: int | None = None  # output index of the open message
        self._call_index: dict[int, int] = {}  # the stream's call index → output index
        self._seq = 0

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    def head(self) -> str:
        return self._event("response.created", response=self.body) + self._event(
            "response.in_progress", response=self.body
        )

    def update(self, out: RequestOutput) -> str:
        events = []
        for d in self.deltas(0, out):
            final = d.finish_reason is not None
            if self.calls is None:
                content, calls = d.text, []
            else:
                content, calls = self.calls.feed(d.text, final=final)
            if content:
                events.append(self._text(content))
            for call in calls:
                events.append(self._call(call))
        return "".join(events)

    def _open_message(self) -> str:
        self._message = len(self.output)
        item = message_item("", new_id("msg"), "in_progress")
        part = item["content"][0]
        item["content"] = []  # `added` shows the item bare, then its part
        self.output.append(item)
        events = self._added(self._message, item)
        item["content"] = [part]
        return events + self._part("response.content_part.added", part)

    def _text(self, delta: str) -> str:
        events = self._open_message() if self._message is None else ""
        assert self._message is not None
        item = self.output[self._message]
        item["content"][0]["text"] += delta
        return events + self._event(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=self._message,
            content_index=0,
            delta=delta,
            logprobs=[],
        )

    def _added(self, index: int, item: dict[str, Any]) -> str:
        return self._event("response.output_item.added", output_index=index, item=item)

    def _part(self, kind: str, part: dict[str, Any]) -> str:
        assert self._message is not None
        item = self.output[self._message]
        return self._event(
            kind, item_id=item["id"], output_index=self._message, content_index=0, part=part
        )

    def _call(self, delta: dict[str, Any]) -> str:
        events = []
        if "id" in delta:  # a new call: its name comes first, its arguments after
            self._call_index[delta["index"]] = len(self.output)
            item = call_item(
                delta["id"], delta["function"]["name"], "", new_id("fc"), "in_progress"
            )
            self.output.append(item)
            events.append(
                self._event(
                    "response.output_item.added", output_index=len(self.output) - 1, item=item
                )
            )
        index = self._call_index[delta["index"]]
        item = self.output[index]
        arguments = delta["function"].get("arguments")
        if arguments:
            item["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=arguments,
                )
            )
        return "".join(events)

    def tail(self, body: dict[str, Any]) -> str:
        """Close every item, then the response; `body` is the final Response object, whose
        `output` this fills in."""
        status = "incomplete" if body["status"] == "incomplete" else "completed"
        # an empty answer is still one message
        events = [] if self.output else [self._open_message()]
        for index, item in enumerate(self.output):
            item["status"] = status
            if item["type"] == "message":
                part = item["content"][0]
                events.append(
                    self._event(
                        "response.output_text.done",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        text=part["text"],
                        logprobs=[],
                    )
                )
                events.append(self._part("response.content_part.done", part))
            else:
                events.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        body["output"] = self.output
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        events.append(self._event(kind, response=body))
        return "".join(events)

    def error(self, error: APIError) -> str:
        """An `error` event, then the response as failed (both clients stop at either)."""
        code = error.code or ("server_error" if error.status >= 500 else "invalid_request")
        failed = {**self.body, "status": "failed", "output": self.output}
        failed["error"] = {"code": code, "message": error.message}
        return self._event(
            "error", code=error.code, message=error.message, param=error.param
        ) + self._event("response.failed", response=failed)


async def _events(
    state: ServerState,
    gen: Generation,
    render: ResponseEvents,
    finish: Callable[[RequestOutput], dict[str, Any]],
    save: Callable[[dict[str, Any]], None],
) -> AsyncIterator[str]:
    status = 499  # unless the stream ends: the client left (or the server gave up on it)
    try:
        pending = render.head()  # sent with the first update, in the same write
        last: RequestOutput | None = None
        async for _, out in gen.outputs():
            last = out
            chunk = pending + render.update(out)
            pending = ""
            if chunk:
                yield chunk
        assert last is not None
        body = finish(last)
        tail = render.tail(body)
        save(body)  # before the client reads `completed`, so it can continue by id at once
        yield pending + tail
        status = 200
    except Exception as exc:  # an engine failure mid-stream: tell the client, in band
        error = as_api_error(exc)
        status = error.status
        yield render.error(error)
    finally:
        state.metrics.count(status)
        await gen.close()


def stream_response(
    state: ServerState,
    gen: Generation,
    render: ResponseEvents,
    finish: Callable[[RequestOutput], dict[str, Any]],
    save: Callable[[dict[str, Any]], None],
    request_id: str,
    headers: dict[str, str] | None = None,
) -> StreamingResponse:
    return StreamingResponse(
        _events(state, gen, render, finish, save),
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "x-request-id": request_id,
            **(headers or {}),
        },
    )
