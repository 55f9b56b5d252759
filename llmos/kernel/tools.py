"""The syscall table. `@tool` turns a typed, documented function into a tool whose JSON schema
comes from its type hints and docstring; `execute` runs one call under a policy in the
workspace sandbox and never raises for a refused or failed call.

`from llmos.kernel.tools import execute, Policy`; the built-in tools live in `builtin_tools.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmos.kernel.sandbox import Refused, workspace_root

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}


@dataclass(slots=True, frozen=True)
class ToolResult:
    ok: bool
    output: str = ""
    error: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.output if self.ok else self.error or "").encode()).hexdigest()

    def observation(self) -> str:
        """What the model reads: the output, or why the call failed."""
        return self.output if self.ok else f"error: {self.error}"


@dataclass(slots=True)
class Policy:
    """What a program's tool calls may do. Checked on every call."""

    allowed_tools: list[str] | None = None  # None: every tool in the table
    read_only: bool = False  # only tools marked read_only
    commands: list[str] = field(default_factory=list)  # run_command's allow-list (argv[0])
    needs_approval: list[str] = field(default_factory=list)  # tools a person must approve
    command_timeout: float = 10.0
    max_output_chars: int = 16_000
    max_file_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        if self.command_timeout <= 0:
            raise ValueError(f"command_timeout must be positive, got {self.command_timeout}")
        if self.max_output_chars < 100:
            raise ValueError(f"max_output_chars must be at least 100, got {self.max_output_chars}")


@dataclass(slots=True, frozen=True)
class ToolContext:
    """Injected into a tool that declares a parameter of this type; not part of its schema."""

    workspace: Path
    policy: Policy


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    read_only: bool = False
    context_param: str | None = None

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


TOOLS: dict[str, Tool] = {}


def _schema_of(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return (
            _schema_of(inner[0]) if len(inner) == 1 else {"anyOf": [_schema_of(a) for a in inner]}
        )
    if origin in (list, tuple):
        return {"type": "array", **({"items": _schema_of(args[0])} if args else {})}
    if origin is dict or annotation is dict:
        return {"type": "object"}
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    raise TypeError(f"@tool: cannot express {annotation!r} in JSON schema")


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    """The summary, and `name: text` lines from an `Args:` section."""
    doc = inspect.cleandoc(doc or "")
    summary, _, rest = doc.partition("Args:")
    params = dict(re.findall(r"^\s*(\w+)\s*(?:\([^)]*\))?:\s*(.+)$", rest, re.MULTILINE))
    return " ".join(summary.split()), params


def tool(
    fn: Callable[..., Any] | None = None, *, name: str | None = None, read_only: bool = False
) -> Any:
    """Register a function as a tool: `@tool` or `@tool(read_only=True)`."""

    def register(f: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(f)
        summary, docs = _doc_parts(f.__doc__ or "")
        props: dict[str, Any] = {}
        required: list[str] = []
        context_param = None
        for pname, param in inspect.signature(f).parameters.items():
            if hints.get(pname) is ToolContext:
                context_param = pname
                continue
            if pname not in hints:
                raise TypeError(f"@tool {f.__name__}: parameter {pname!r} needs a type hint")
            props[pname] = _schema_of(hints[pname]) | (
                {"description": docs[pname]} if pname in docs else {}
            )
            if param.default is inspect.Parameter.empty:
                required.append(pname)
        schema = {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }
        t = Tool(name or f.__name__, summary, schema, f, read_only, context_param)
        TOOLS[t.name] = t
        f.tool = t  # type: ignore[attr-defined]
        return f

    return register(fn) if fn is not None else register


def _check_args(t: Tool, args: dict[str, Any]) -> None:
    props = t.parameters["properties"]
    unknown = sorted(set(args) - set(props))
    if unknown:
        raise Refused(f"{t.name}: unknown argument(s) {unknown}; it takes {sorted(props)}")
    missing = [p for p in t.parameters["required"] if p not in args]
    if missing:
        raise Refused(f"{t.name}: missing required argument(s) {missing}")
    for key, value in args.items():
        want = props[key].get("type")
        ok = {
            "string": str,
            "integer": int,
            "number": (int, float),
            "boolean": bool,
            "array": list,
            "object": dict,
        }.get(want, object)
        if not isinstance(value, ok) or (want in ("integer", "number") and isinstance(value, bool)):
            raise Refused(f"{t.name}: argument {key!r} must be of type {want}")


def execute(
    name: str,
    arguments: str | dict[str, Any] | None,
    workspace: str | Path,
    policy: Policy | None = None,
    *,
    table: dict[str, Tool] | None = None,
) -> ToolResult:
    """Run one tool call. A refusal or a failure is a ToolResult with ok=False and the reason."""
    policy = policy or Policy()
    table = TOOLS if table is None else table
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
        _check_args(t, args)
        if t.context_param:
            args = {**args, t.context_param: ToolContext(workspace_root(workspace), policy)}
        out = t.fn(**args)
        if inspect.isawaitable(out):
            out = asyncio.run(_await(out))
        text = out if isinstance(out, str) else json.dumps(out, default=str)
        if len(text) > policy.max_output_chars:
            cut = len(text) - policy.max_output_chars
            text = text[: policy.max_output_chars] + f"\n[... {cut} more characters cut]"
        return ToolResult(True, text)
    except Refused as exc:
        return ToolResult(False, error=f"refused: {exc}"[: policy.max_output_chars])
    except json.JSONDecodeError as exc:
        return ToolResult(False, error=f"refused: arguments are not valid JSON ({exc.msg})")
    except Exception as exc:  # noqa: BLE001 - a failed tool is an observation, not a crash
        return ToolResult(False, error=f"{type(exc).__name__}: {exc}"[: policy.max_output_chars])


async def _await(awaitable: Any) -> Any:
    return await awaitable


# The built-in tools register themselves in TOOLS (they need the names above).
from llmos.kernel import builtin_tools  # noqa: E402, F401
