"""What the server refuses before any work: a wrong key, a body too big, a full queue.

`Guard` is plain ASGI middleware so it runs before FastAPI reads the body: an unauthenticated
client gets 401 even for a malformed body, and an oversized body is never held whole.
`Admission` counts sequences in flight and refuses (429) a request that would have to wait
behind more than `max_waiting` others.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos.server.errors import APIError
from llmos.server.messages_protocol import error_response as messages_error

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class Guard:
    """ASGI middleware: API key (on /v1; `Authorization: Bearer KEY`, or `x-api-key: KEY` as
    Anthropic's clients send it), body size limit, and refusal while draining."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        is_draining: Callable[[], bool],
        on_refused: Callable[[str, int], None],
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.is_draining = is_draining
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        error = self._check_headers(scope) if path.startswith("/v1") else None
        if error is None and scope["method"] in _BODY_METHODS:
            body, error = await self._read_body(scope, receive)
            if error is None:
                receive = _replay(body, receive)
        if error is not None:
            if path.startswith("/v1"):
                self.on_refused(path, error.status)
            # Anthropic's clients read their own error shape
            response = (
                messages_error(error) if path.startswith("/v1/messages") else error.response()
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check_headers(self, scope: Scope) -> APIError | None:
        if self.is_draining():
            return APIError(503, "the server is shutting down", code="shutting_down")
        if self.api_key is None:
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        x_api_key = headers.get(b"x-api-key")  # how Anthropic's clients send it
        scheme, _, key = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key):
            return None
        if x_api_key is not None and hmac.compare_digest(x_api_key.strip(), self.api_key):
            return None
        message = (
            "Incorrect API key provided."
            if auth or x_api_key is not None
            else "Missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'."
        )
        return APIError(401, message, code="invalid_api_key")

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, APIError | None]:
        too_big = APIError(
            413,
            f"the request body is over the limit of {self.max_body_bytes} bytes",
            code="request_too_large",
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return b"", too_big
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the app will see the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body once, then waits on the real one (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class Admission:
    """Counts sequences in flight; the engine runs `max_running` of them, the rest wait.

    A request is refused when admitting it would leave more than `max_waiting` sequences
    waiting, counted either way: past the batch's size, or in the engine's own queue (which also
    holds those waiting for KV room).
    """

    def __init__(
        self, max_waiting: int | None, max_running: int, engine_waiting: Callable[[], int]
    ) -> None:
        self.max_waiting = max_waiting
        self.max_running = max_running
        self.engine_waiting = engine_waiting
        self.in_flight = 0

    def enter(self, num_seqs: int) -> Ticket:
        if self.max_waiting is not None:
            queued = self.engine_waiting()
            waiting = max(
                self.in_flight + num_seqs - self.max_running, queued + num_seqs if queued else 0
            )
            if waiting > self.max_waiting:
                raise APIError(
                    429,
                    f"the server is busy: {waiting} sequences would be waiting "
                    f"(the limit is {self.max_waiting}); retry shortly",
                    code="server_busy",
                    headers={"Retry-After": "1"},
                )
        self.in_flight += num_seqs
        return Ticket(self, num_seqs)


class Ticket:
    """One admitted request's place; `release` is idempotent, so every exit path may call it."""

    __slots__ = ("_admission", "_num_seqs")

    def __init__(self, admission: Admission, num_seqs: int) -> None:
        self._admission: Admission | None = admission
        self._num_seqs = num_seqs

    def release(self) -> None:
        if self._admission is not None:
            self._admission.in_flight -= self._num_seqs
            self._admission = None

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
