"""The OpenAPI document: the real request and response bodies of the routes.

The generation routes read their body themselves (so a bad one gets OpenAI's 400, not FastAPI's
422, and a stream can start before anything else is parsed), which hides the body from
FastAPI's generator. Each such route names its request model here, and the document gains it,
so a client generator sees what OpenAI's clients send.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from llmos.server import fields

_REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every refusal, as OpenAI sends it."""

    error: ErrorDetail


def body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads a JSON `model` from its body."""
    ref = _REF.format(model=model.__name__)
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": ref}}},
        }
    }


def responses(model: type[BaseModel], *, stream: bool) -> dict[int | str, dict[str, Any]]:
    """The route's answers: `model`, or server-sent events when it streams; errors as OpenAI's."""
    ok: dict[str, Any] = {"model": model, "description": "The answer."}
    if stream:  # the generation routes: they name the body fields they did not read
        ok["headers"] = {
            fields.HEADER: {
                "description": "Request fields the server did not read, comma-separated "
                "(paths such as messages[0].foo); absent when it read them all.",
                "schema": {"type": "string"},
            }
        }
        ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
        ok["description"] = "The answer; with `stream: true`, server-sent events ending in [DONE]."
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": why}
        for status, why in (
            (400, "A bad request, naming the field."),
            (401, "A missing or wrong API key."),
            (404, "An unknown model."),
            (413, "A body over the size limit."),
            (429, "The server is busy."),
            (503, "The server is shutting down."),
        )
    }
    return {200: ok, **errors}


def _error_ref(description: str) -> dict[str, Any]:
    ref = _REF.format(model=ErrorResponse.__name__)
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


def install(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Build the document with `models`, the bodies the routes name with `body`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # FastAPI documents a 422 for routes with parameters; this server answers 400
        for path in schema["paths"].values():
            for operation in path.values():
                if operation["responses"].pop("422", None) is not None:
                    operation["responses"].setdefault("400", _error_ref("A bad parameter."))
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for model in models:
            doc = model.model_json_schema(ref_template=_REF)
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
