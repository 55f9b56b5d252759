"""The syscall layer: a tool table (the built-ins plus a program's own tools) and `execute`,
which runs one call under a policy in the workspace sandbox and never raises for a refused or
failed call. Arguments are checked against the tool's JSON schema before it runs; a Python
tool runs under a timeout, and what it prints is captured (capped) into its result.

`from llmos.kernel.tools import execute, Policy, tool`; the built-ins are in `builtin_tools.py`,
what a tool is in `toolspec.py`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jsonschema.exceptions import best_match

from llmos.kernel import argtypes, capture
from llmos.kernel.builtin_tools import BUILTINS as _BUILTINS
from llmos.kernel.sandbox import Refused, workspace_root
from llmos.kernel.toolspec import Policy, Tool, ToolContext, ToolResult, tool, tool_of

BUILTINS: Mapping[str, Tool] = MappingProxyType(_BUILTINS)
TOOLS = BUILTINS  # read-only: a program's own tools join them in its table, never here
COMMAND_MARGIN = 5.0  # seconds run_command gets past its own timeout before it is abandoned


def table(own: Iterable[Any] = ()) -> dict[str, Tool]:
    """A tool table: the built-ins plus `own` (@tool functions or Tools), which win a clash."""
    tools = dict(BUILTINS)
    for value in own:
        t = tool_of(value)
        if t is None:
            raise TypeError(f"{value!r} is not a tool; decorate it with @tool")
        tools[t.name] = t
    return tools


def _where(path: Iterable[Any]) -> str:
    """`items[0].name` from a jsonschema error path."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check_args(t: Tool, args: dict[str, Any]) -> dict[str, Any]:
    """Refuse arguments that do not match the tool's schema, naming the field."""
    props = t.parameters.get("properties", {})
    unknown = sorted(set(args) - set(props))
    if unknown and t.parameters.get("additionalProperties") is False:
        raise Refused(f"{t.name}: unknown argument(s) {unknown}; it takes {sorted(props)}")
    missing = [p for p in t.parameters.get("required", []) if p not in args]
    if missing:
        raise Refused(f"{t.name}: missing required argument(s) {missing}")
    error = best_match(t.validator.iter_errors(args))
    if error is not None:
        where = _where(error.absolute_path)
        field = f"argument {where!r}: " if where else ""
        raise Refused(f"{t.name}: {field}{error.message}"[:2000])
    # JSON has one number type: 3.0 is a valid integer, and the function gets the int
    return {
        k: int(v) if isinstance(v, float) and props.get(k, {}).get("type") == "integer" else v
        for k, v in args.items()
    }


def execute(
    name: str,
    arguments: str | dict[str, Any] | None,
    workspace: str | Path,
    policy: Policy | None = None,
    *,
    table: Mapping[str, Tool] | None = None,
) -> ToolResult:
    """Run one tool call. A refusal or a failure is a ToolResult with ok=False and the reason."""
    policy = policy or Policy()
    table = BUILTINS if table is None else table
    cap = policy.max_output_chars
    try:
        t = table.get(name) if isinstance(name, str) else None
        if t is None:
            raise Refused(f"unknown tool {name!r}; the tools are {sorted(table)}")
        if policy.allowed_tools is not None and name not in policy.allowed_tools:
            raise Refused(f"tool {name!r} is not allowed for this program")
        if policy.read_only and not t.read_only:
            raise Refused(f"tool {name!r} writes, and this program is read-only")
        args = json.loads(arguments or "{}") if isinstance(arguments, str) else (arguments or {})
        if not isinstance(args, dict):
            raise Refused("arguments must be a JSON object")
        args = check_args(t, args)
        ctx = ToolContext(workspace_root(workspace), policy)
        argtypes.check(t, args, ctx)
        if t.context_param:
            args = {**args, t.context_param: ctx}
        timeout = policy.tool_timeout
        if t is BUILTINS.get("run_command"):
            timeout = max(timeout, policy.command_timeout + COMMAND_MARGIN)
        out, printed = _call(t, args, timeout, cap)
        text = out if isinstance(out, str) else json.dumps(out, default=str)
        if printed:
            text = f"{text}\n[printed]\n{printed}" if text else printed
        if len(text) > cap:
            cut = len(text) - cap
            text = text[:cap] + f"\n[... {cut} more characters cut]"
        return ToolResult(True, text)
    except Refused as exc:
        return ToolResult(False, error=f"refused: {exc}"[:cap])
    except json.JSONDecodeError as exc:
        return ToolResult(False, error=f"refused: arguments are not valid JSON ({exc.msg})")
    except Exception as exc:  # noqa: BLE001 - a failed tool is an observation, not a crash
        return ToolResult(False, error=f"{type(exc).__name__}: {str(exc)[:cap]}"[:cap])


def _call(t: Tool, args: dict[str, Any], timeout: float, cap: int) -> tuple[Any, str]:
    """Run the tool in its own thread, so a hang costs that thread and not the caller. Returns
    its value and what it printed (cut at `cap`)."""
    box: dict[str, Any] = {}
    sink = capture.Sink(cap)

    def target() -> None:
        with capture.into(sink):
            try:
                out = t.fn(**args)
                if inspect.isawaitable(out):
                    out = asyncio.run(_await(out))
                box["out"] = out
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box["exc"] = exc

    worker = threading.Thread(target=target, name=f"llmos-tool-{t.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise Refused(
            f"{t.name} ran past its {timeout:g}s timeout (policy.tool_timeout) and was "
            f"abandoned; printed so far:\n{sink.text()}"
        )
    if "exc" in box:
        exc = box["exc"]
        if not isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt from a tool
            raise RuntimeError(f"{t.name} raised {type(exc).__name__}: {exc}")
        raise exc
    return box.get("out"), sink.text()


async def _await(awaitable: Any) -> Any:
    return await awaitable


__all__ = [
    "BUILTINS",
    "Policy",
    "Refused",
    "Tool",
    "ToolContext",
    "ToolResult",
    "check_args",
    "execute",
    "table",
    "tool",
]
