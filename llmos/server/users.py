"""API keys → users. A user sees and controls only their own processes and usage; an admin
sees all of them.

`--api-keys FILE` is YAML (or JSON): each key maps to a user's name, or to `{user, admin}`:

    sk-alice: alice
    sk-ops: {user: ops, admin: true}

`--api-key KEY` alone is one admin key. With no key at all the server is single-user: every
caller is the admin, with no name (as `llmos run` without `--user`).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from starlette.types import ASGIApp, Receive, Scope, Send

from llmos.errors import RequestError
from llmos.server.errors import APIError
from llmos.server.messages_protocol import error_response as messages_error


@dataclass(frozen=True, slots=True)
class User:
    name: str | None  # None: the single user of a server without keys
    admin: bool = False

    def owns(self, owner: str | None) -> bool:
        return self.admin or (self.name is not None and owner == self.name)


ANONYMOUS_ADMIN = User(None, admin=True)


class Users:
    def __init__(self, keys: dict[str, User] | None = None) -> None:
        self.keys = dict(keys or {})

    @property
    def open(self) -> bool:
        """No keys: every caller is the admin."""
        return not self.keys

    @classmethod
    def load(cls, path: str | Path | None = None, api_key: str | None = None) -> Users:
        """The keys of `path` (see the module's doc), plus `api_key` as an admin's."""
        keys: dict[str, User] = {}
        if path is not None:
            keys.update(parse_keys(_read(Path(path)), str(path)))
        if api_key:
            keys.setdefault(api_key, User("admin", admin=True))
        return cls(keys)

    def lookup(self, key: bytes | None) -> User | None:
        if self.open:
            return ANONYMOUS_ADMIN
        if key is None:
            return None
        found = None
        for k, user in self.keys.items():  # every key compared: no early exit to time
            if hmac.compare_digest(key, k.encode()):
                found = user
        return found


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RequestError(
            f"--api-keys: cannot read {str(path)!r}: {exc}", param="api_keys"
        ) from None
    except yaml.YAMLError as exc:
        raise RequestError(
            f"--api-keys: {path} is not valid YAML: {exc}", param="api_keys"
        ) from None


def parse_keys(data: Any, where: str = "api_keys") -> dict[str, User]:
    if not isinstance(data, dict) or not data:
        raise RequestError(
            f"{where}: a mapping of API key → user (or {{user, admin}})", param="api_keys"
        )
    out: dict[str, User] = {}
    for i, (key, value) in enumerate(data.items()):
        label = f"{where}: key #{i + 1}"
        if not isinstance(key, str) or len(key.strip()) < 8:
            raise RequestError(
                f"{label}: an API key is a string of 8 characters or more", param="api_keys"
            )
        if isinstance(value, str):
            value = {"user": value}
        if not isinstance(value, dict) or set(value) - {"user", "admin"}:
            raise RequestError(
                f"{label}: the value is a user name or {{user, admin}}", param="api_keys"
            )
        name, admin = value.get("user"), value.get("admin", False)
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"{label}: user must be a non-empty name", param="api_keys")
        if not isinstance(admin, bool):
            raise RequestError(f"{label}: admin must be true or false", param="api_keys")
        out[key.strip()] = User(name.strip(), admin)
    return out


def key_of(headers: dict[bytes, bytes]) -> bytes | None:
    """`Authorization: Bearer KEY`, or `x-api-key: KEY` as Anthropic's clients send it."""
    scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer" and key.strip():
        return key.strip()
    x_api_key = headers.get(b"x-api-key")
    return x_api_key.strip() if x_api_key is not None else None


class Authenticate:
    """ASGI middleware on /v1: the caller's key becomes `request.state.llmos_user`; an unknown
    key is a 401 in OpenAI's shape (Anthropic's on /v1/messages)."""

    def __init__(self, app: ASGIApp, *, users: Users, on_refused: Any) -> None:
        self.app = app
        self.users = users
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = key_of(headers)
        user = self.users.lookup(key)
        if user is None:
            message = (
                "Incorrect API key provided."
                if key is not None or b"authorization" in headers
                else "Missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'."
            )
            error = APIError(401, message, code="invalid_api_key")
            self.on_refused(scope["path"], 401)
            path = scope["path"]
            response = (
                messages_error(error) if path.startswith("/v1/messages") else error.response()
            )
            return await response(scope, receive, send)
        scope.setdefault("state", {})["llmos_user"] = user
        return await self.app(scope, receive, send)


def user_of(request: Any) -> User:
    """The caller, as `Authenticate` found them (it runs on every /v1 route)."""
    user = getattr(request.state, "llmos_user", None)
    if user is None:
        raise APIError(401, "no API key was checked for this route", code="invalid_api_key")
    return user
