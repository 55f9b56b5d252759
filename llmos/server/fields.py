"""Request fields the server does not act on: reported, never silently dropped.

A request may carry fields llmos does not read: a misspelling (`max_token`), a field of a newer
OpenAI API (`store`, `service_tier`), or one of a feature that does not exist yet. Each is named,
by its path in the body (`messages[0].foo`), in the `x-llmos-ignored-fields` response header and
in the log; with `strict_fields` the request is refused instead, as OpenAI's API refuses them.
The extras the server does read (`priority`, `top_k`, `ignore_eos`...) are declared fields.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from fastapi import Request
from pydantic import BaseModel

from llmos.server.errors import APIError

log = logging.getLogger(__name__)

HEADER = "x-llmos-ignored-fields"
_MAX_LISTED = 32  # names in one header or message; the rest are counted

# Fields typed as free-form objects, with the keys of them that the server reads.
_RESPONSE_FORMAT = {"type", "json_schema"}
_JSON_SCHEMA = {"name", "description", "schema", "strict"}
_TOOL = {"type", "function"}
_FUNCTION = {"name", "description", "parameters", "strict"}


def ignored_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """The paths of every field in `model` (nested ones too) that the server does not read."""
    out = [prefix + key for key in model.model_extra or {}]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += ignored_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out += ignored_fields(item, f"{prefix}{name}[{i}].")
    if not prefix:
        out += _free_form(model)
    return out


def _free_form(model: BaseModel) -> list[str]:
    """Unknown keys in `response_format` and `tools`, which are read as plain dicts."""
    out: list[str] = []
    fmt = getattr(model, "response_format", None)
    if isinstance(fmt, dict):
        out += _unknown(fmt, _RESPONSE_FORMAT, "response_format.")
        if isinstance(fmt.get("json_schema"), dict):
            out += _unknown(fmt["json_schema"], _JSON_SCHEMA, "response_format.json_schema.")
    for i, tool in enumerate(getattr(model, "tools", None) or []):
        if isinstance(tool, dict):
            out += _unknown(tool, _TOOL, f"tools[{i}].")
            if isinstance(tool.get("function"), dict):
                out += _unknown(tool["function"], _FUNCTION, f"tools[{i}].function.")
    return out


def _unknown(d: dict[str, Any], known: set[str], prefix: str) -> list[str]:
    return [prefix + k for k, v in d.items() if k not in known and v is not None]


def _listed(names: list[str]) -> str:
    """Names for a header: printable ASCII only (a JSON key may hold anything), capped."""
    shown = [quote(n, safe="!#$&'()*+/:;=?@[]~") or '""' for n in names[:_MAX_LISTED]]
    if len(names) > _MAX_LISTED:
        shown.append(f"...({len(names) - _MAX_LISTED} more)")
    return ",".join(shown)


def check(request: Request, body: BaseModel, *, strict: bool) -> dict[str, str]:
    """Refuse (strict) or report the ignored fields; the headers every response carries.

    The header is also kept on `request.state`, so error responses carry it too."""
    names = ignored_fields(body)
    if not names:
        return {}
    listed = _listed(names)
    if strict:
        raise APIError(
            400,
            f"Unrecognized request argument supplied: {', '.join(names[:_MAX_LISTED])}"
            + (f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""),
            param=names[0],
            code="unknown_parameter",
        )
    log.warning(
        "%s: ignored request fields: %s",
        request.url.path,
        listed,
        extra={"path": request.url.path, "ignored_fields": names},
    )
    headers = {HEADER: listed}
    request.state.llmos_headers = headers  # see errors.install
    return headers
