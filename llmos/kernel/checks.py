"""The cascade's deterministic checks: each returns why an answer fails, or None. They see the
request and the answer, never a gold answer."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jsonschema

from llmos.backends.base import ChatResult, Message
from llmos.kernel.tools import Policy, execute


class CascadeError(ValueError):
    """A cascade name or `cascade:` section that cannot be used; the message names the field."""


def tool_args(result: ChatResult, tools: list[dict[str, Any]]) -> str | None:
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    for call in result.tool_calls:
        if call.name not in schemas:
            return f"tool call: unknown tool {call.name!r}; the tools are {sorted(schemas)}"
        try:
            args = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as exc:
            return f"tool call {call.name}: the arguments are not JSON ({exc.msg})"
        try:
            jsonschema.validate(args, schemas[call.name])
        except jsonschema.ValidationError as exc:
            return f"tool call {call.name}: the arguments do not match its schema: {exc.message}"
    return None


def schema(text: str, schema: dict[str, Any]) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"the answer is not JSON ({exc.msg})"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"the answer does not match the output schema: {exc.message}"
    return None


def python(
    spec: str, source: str | None, result: ChatResult, messages: list[Message]
) -> str | None:
    fn = check_function(spec, source)
    try:
        verdict = fn(result.content, result.tool_calls, messages)
    except Exception as exc:  # noqa: BLE001 - the program's check failing is a failed check
        return f"the python check {spec} raised {type(exc).__name__}: {exc}"
    if verdict is True or verdict is None:
        return None
    if verdict is False:
        return f"the python check {spec} rejected the answer"
    return f"the python check {spec}: {verdict}"


def check_function(spec: str, source: str | None) -> Callable[..., Any]:
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        module: Any = importlib.import_module(module_name)
    else:  # a function in the program's own .py file (loaded with the program)
        attr = spec
        real = os.path.realpath(source) if source else None
        module = next((m for m in list(sys.modules.values()) if defined_in(m, real)), None)
        if source is None or module is None:
            raise CascadeError(
                f"cascade.python: {spec!r} names no function: the program has no .py file; "
                "use 'module:function'"
            )
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CascadeError(f"cascade.python: {spec!r} is not a function")
    return fn


def defined_in(module: Any, path: str | None) -> bool:
    file = getattr(module, "__file__", None)
    if not file or not path or os.path.basename(file) != os.path.basename(path):
        return False
    return os.path.realpath(file) == path


def command(
    argv: list[str], result: ChatResult, workspace: str | None, policy: Policy | None
) -> str | None:
    if workspace is None:
        raise CascadeError("cascade.command needs a process's workspace (run it in the kernel)")
    answer = result.content or ""
    args = [a.replace("{answer}", answer) for a in argv]
    policy = dataclasses.replace(policy or Policy(), allowed_tools=None, read_only=False)
    if args[0] not in policy.commands:  # the program's own check, not the model's call
        policy.commands = [*policy.commands, args[0]]
    run = execute("run_command", {"argv": args}, workspace, policy)
    if not run.ok:
        return f"the check command {' '.join(argv)} could not run: {run.error}"
    if not run.output.startswith("exit code 0"):
        return f"the check command {' '.join(argv)} failed: {run.output[-400:]}"
    return None
