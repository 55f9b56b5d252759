"""Every error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

The official clients pick their exception class from the status code and read this body, so
each refusal (bad JSON, a bad field, a wrong key, overload) must come out this way, including
those FastAPI and Starlette raise on their own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos.errors import RequestError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """A refusal with an HTTP status; `body()` is what the client reads."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as a stream event: the client raises it mid-stream."""
        return f"data: {json.dumps(self.body())}\n\n"

    @classmethod
    def from_request_error(cls, exc: RequestError) -> APIError:
        return cls(400, str(exc), param=exc.param, code=exc.code)

    @classmethod
    def internal(cls, exc: BaseException) -> APIError:
        return cls(
            500,
            f"the engine failed on this request: {type(exc).__name__}: {exc}",
            code="internal_error",
        )


class ClientDisconnected(Exception):
    """The client went away before its response was ready (counted, answered 499)."""


def _param(loc: Sequence[int | str]) -> str | None:
    """('body', 'messages', 0, 'role') → 'messages[0].role'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def from_validation(errors: Sequence[Any]) -> APIError:
    """The first pydantic error, named by field, or a plain 'malformed JSON'."""
    if not errors:
        return APIError(400, "the request body is not valid")
    err = errors[0]
    if err.get("type") == "json_invalid":
        detail = err.get("ctx", {}).get("error", err["msg"])
        return APIError(400, f"malformed JSON in the request body: {detail}", code="invalid_json")
    # a union's member name (e.g. 'list[int]') is noise in a field path
    loc = [p for p in err.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p == "str"))]
    param = _param(loc)
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    message = f"{param}: {err['msg']}{more}" if param else f"{err['msg']}{more}"
    return APIError(400, message, param=param, code="invalid_value")


_ANSWERED = (APIError, RequestError, ValidationError, ClientDisconnected, StarletteHTTPException)


@contextmanager
def internal_errors(path: str) -> Iterator[None]:
    """A route's own bug becomes a 500 in OpenAI's shape, raised where FastAPI answers it.

    Left to the catch-all `Exception` handler, Starlette's outermost middleware would answer and
    then re-raise it, and uvicorn closes the connection: the client's next request on that
    keep-alive connection fails with a reset."""
    try:
        yield
    except _ANSWERED:
        raise
    except Exception as exc:
        log.exception("unexpected error on %s", path)
        raise APIError.internal(exc) from exc


def install(app: FastAPI, on_error: Callable[[Request, int], None]) -> None:
    """Turn every exception a route can raise into an OpenAI error; `on_error` counts it."""

    def reply(request: Request, err: APIError) -> JSONResponse:
        on_error(request, err.status)
        response = err.response()
        # headers every response to this request carries (x-llmos-ignored-fields)
        response.headers.update(getattr(request.state, "llmos_headers", {}))
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return reply(request, exc)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return reply(request, APIError.from_request_error(exc))

    @app.exception_handler(ValidationError)
    async def validation_error(request: Request, exc: ValidationError) -> JSONResponse:
        return reply(request, from_validation(exc.errors()))

    @app.exception_handler(RequestValidationError)
    async def fastapi_validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        return reply(request, from_validation(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return reply(request, APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(ClientDisconnected)
    async def client_left(request: Request, exc: ClientDisconnected) -> Response:
        on_error(request, 499)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return reply(request, APIError.internal(exc))
