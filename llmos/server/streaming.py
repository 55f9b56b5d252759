"""Server-sent events: deltas from the engine's cumulative snapshots, and the stream's life.

The engine hands out whole-so-far snapshots; a stream sends only what is new in each choice.
Each engine step's events go out in one write. The stream ends with `data: [DONE]`, or with an
error event that the official clients raise, and always closes its generation (a client that
leaves aborts its requests).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from llmos.engine.sequence import RequestOutput, TokenLogprob
from llmos.engine.tool_calls import OPEN, new_call_id, scan_calls
from llmos.server.generation import Generation, as_api_error
from llmos.server.protocol import Usage
from llmos.server.state import ServerState

DONE = "data: [DONE]\n\n"


def event(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def usage_of(outputs: list[RequestOutput]) -> Usage:
    """Prompt tokens of every prompt; completion tokens of every choice."""
    usage = Usage.of(
        sum(len(out.prompt_token_ids) for out in outputs),
        sum(len(o.token_ids) for out in outputs for o in out.outputs),
    )
    if any("spec_num_drafts" in out.metrics for out in outputs):  # the engine speculates
        drafts, tokens, accepted = (
            int(sum(out.metrics.get(f"spec_num_{k}", 0) for out in outputs))
            for k in ("drafts", "draft_tokens", "accepted_tokens")
        )
        usage.speculation = {  # type: ignore[attr-defined]
            "num_drafts": drafts,
            "num_draft_tokens": tokens,
            "num_accepted_tokens": accepted,
            "mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else 1.0,
        }
    return usage


@dataclass(slots=True)
class ChoiceDelta:
    index: int  # the choice's index in the response: prompt index * n + output index
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    first: bool  # this choice's first delta


class Deltas:
    """What each choice gained since the previous snapshot."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._sent: dict[int, tuple[int, int]] = {}  # choice → (characters, logprob entries)
        self._finished: set[int] = set()

    def __call__(self, prompt_index: int, out: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            if index in self._finished:
                continue
            first = index not in self._sent
            chars, entries = self._sent.get(index, (0, 0))
            text = o.text[chars:]
            logprobs = o.logprobs[entries:] if o.logprobs is not None else None
            if not text and not logprobs and o.finish_reason is None and not first:
                continue
            self._sent[index] = (len(o.text), len(o.logprobs or ()))
            if o.finish_reason is not None:
                self._finished.add(index)
            deltas.append(ChoiceDelta(index, text, logprobs, o.finish_reason, first))
        return deltas


class ToolCallStream:
    """One choice's reply while tools may be called: content deltas for an answer, or OpenAI's
    `tool_calls` deltas (index, id, type and name first, then `arguments` in pieces) once the
    reply opens with `<tool_call>`. A reply that might still become a call is held back."""

    def __init__(self) -> None:
        self.text = ""
        self.calling: bool | None = None  # None: undecided
        self.ids: list[str] = []
        self.sent: list[int] = []  # characters of each call's arguments already sent

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_call deltas) for the reply's next piece of text."""
        self.text += text
        if self.calling is None:
            if self.text.startswith(OPEN):
                self.calling = True
            elif OPEN.startswith(self.text) and not final:
                return "", []
            else:
                self.calling = False
                return self.text, []
        if not self.calling:
            return text, []
        deltas: list[dict[str, Any]] = []
        for i, call in enumerate(scan_calls(self.text[len(OPEN) :])):
            delta: dict[str, Any] = {"index": i, "function": {}}
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.sent.append(0)
                delta.update(
                    id=self.ids[i], type="function", function={"name": call.name, "arguments": ""}
                )
            if len(call.arguments) > self.sent[i]:
                delta["function"]["arguments"] = call.arguments[self.sent[i] :]
                self.sent[i] = len(call.arguments)
            if delta["function"]:
                deltas.append(delta)
        return "", deltas


def filtered_error(outputs: list[RequestOutput]) -> str:
    """An error event after the chunks when an output guard stopped a choice (its finish_reason
    is `content_filter`): the official clients raise it, so a stream cut short is not mistaken
    for a whole answer."""
    n = max((len(out.outputs) for out in outputs), default=1)
    cut = [
        i * n + o.index
        for i, out in enumerate(outputs)
        for o in out.outputs
        if o.finish_reason == "content_filter"
    ]
    if not cut:
        return ""
    message = f"an output guard stopped choice(s) {cut}: finish_reason is content_filter"
    error = {"message": message, "type": "content_filter", "param": "guards"}
    return event({"error": {**error, "code": "content_filter"}})


class Renderer(Protocol):
    """Turns a generation's outputs into one endpoint's stream chunks."""

    def head(self) -> str: ...

    def update(self, prompt_index: int, out: RequestOutput) -> str: ...

    def tail(self, usage: Usage) -> str: ...


async def _events(state: ServerState, gen: Generation, render: Renderer) -> AsyncIterator[str]:
    status = 499  # unless the stream ends: the client left (or the server gave up on it)
    try:
        last: dict[int, RequestOutput] = {}
        pending = render.head()  # sent with the first update, in the same write
        async for i, out in gen.outputs():
            last[i] = out
            chunk = pending + render.update(i, out)
            pending = ""
            if chunk:
                yield chunk
        outs = [last[i] for i in sorted(last)]
        yield pending + render.tail(usage_of(outs)) + filtered_error(outs) + DONE
        status = 200
    except Exception as exc:  # an engine failure mid-stream: tell the client, in band
        error = as_api_error(exc)
        status = error.status
        yield error.sse() + DONE
    finally:
        state.metrics.count(status)
        await gen.close()


def sse_response(
    state: ServerState,
    gen: Generation,
    render: Renderer,
    request_id: str,
    headers: dict[str, str] | None = None,
) -> StreamingResponse:
    return StreamingResponse(
        _events(state, gen, render),
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "x-request-id": request_id,
            **(headers or {}),
        },
    )
