"""Guards on the HTTP server: `llmos serve --guards guards.yaml` (a list of guard objects) and the
per-request `guards` extra, for every endpoint (chat, completions, responses, messages).

Each engine request gets the server's guards plus its own. Input guards are checked here on the
user's own text (chat and responses messages with role `user`, completions' prompts): a
`block` match is refused (400, code `content_filter`); canary guards are bound to the markers
in the request's system prompt. Output guards run in the engine, as the text streams.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from starlette.requests import Request

from llmos.engine.guard_filter import check_text
from llmos.engine.guards import Guard, at_stage, parse_guards
from llmos.engine.sampling import SamplingParams
from llmos.errors import RequestError
from llmos.server.errors import APIError

log = logging.getLogger(__name__)


def load_guards(path: str | Path) -> list[Guard]:
    """A guards.yaml file: a list of guard objects (or `{guards: [...]}`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RequestError(f"--guards {path}: cannot read it: {exc}", param="guards") from None
    if isinstance(data, dict) and set(data) == {"guards"}:
        data = data["guards"]
    try:
        return parse_guards(data)
    except RequestError as exc:
        raise RequestError(f"--guards {path}: {exc}", param=exc.param) from None


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text") or "") for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def request_texts(body: dict[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """((field, user text) pairs, system prompt) of a chat, completions, responses or messages
    request body."""
    users: list[tuple[str, str]] = []
    system: list[str] = [_content(body.get("system")), str(body.get("instructions") or "")]
    for key in ("messages", "input"):
        items = body.get(key)
        if isinstance(items, str):
            users.append((key, items))
        elif isinstance(items, list):
            for i, m in enumerate(items):
                if not isinstance(m, dict):
                    continue
                if m.get("role") == "user":
                    users.append((f"{key}[{i}].content", _content(m.get("content"))))
                elif m.get("role") in ("system", "developer"):
                    system.append(_content(m.get("content")))
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            users.append(("prompt" if isinstance(prompt, str) else f"prompt[{i}]", p))
    return users, "\n".join(s for s in system if s)


async def prepare(
    server_guards: list[Guard], request: Request, params: list[SamplingParams]
) -> list[SamplingParams]:
    """Each job's params with the server's guards added and canaries bound; input guards run."""
    if not server_guards and not any(p.guards for p in params):
        return params
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = {}
    users, system = request_texts(body if isinstance(body, dict) else {})
    out = []
    for p in params:
        guards = []
        for g in [*server_guards, *(p.guards or [])]:
            bound = g.with_canary(system)
            if bound is not None:
                guards.append(bound)
        for g in at_stage(guards, "input"):
            check_input(g, users)
        out.append(dataclasses.replace(p, guards=guards or None))
    return out


def check_input(guard: Guard, users: list[tuple[str, str]]) -> None:
    for field, text in users:
        checked = check_text([guard], text)
        if checked.blocked is not None:
            raise APIError(
                400,
                f"{field}: refused by input {checked.blocked.message()}",
                param=field,
                code="content_filter",
            )
        for trip in checked.trips:
            log.info("input guard %s: %s in %s", guard.name, trip.action, field)
