"""What a tool is: `@tool` turns a typed, documented function into a `Tool` whose JSON schema
comes from its type hints and docstring, and attaches it to the function (`fn.tool`). Nothing
is registered globally: each program collects its own tools (see `tools.table`).

Also the `Policy` a program's calls run under and the `ToolResult` a call returns."""

from __future__ import annotations

import hashlib
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}
Validator = jsonschema.Draft202012Validator


@dataclass(slots=True, frozen=True)
class ToolResult:
    ok: bool
    output: str = ""
    error: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.output if self.ok else self.error or "").encode()).hexdigest()


@dataclass(slots=True)
class Policy:
    """What a program's tool calls may do. Checked on every call."""

    allowed_tools: list[str] | None = None  # None: every tool in the table
    read_only: bool = False  # only tools marked read_only
    commands: list[str] = field(default_factory=list)  # run_command's allow-list (argv[0])
    needs_approval: list[str] = field(default_factory=list)  # tools a person must approve
    command_timeout: float = 10.0
    # A Python tool that runs longer is abandoned (its thread cannot be stopped) and the call
    # fails; run_command gets at least command_timeout plus a margin.
    tool_timeout: float = 60.0
    max_output_chars: int = 16_000
    max_file_bytes: int = 1_000_000
    max_written_bytes: int = 64 << 20  # the largest file a command may write (RLIMIT_FSIZE)
    network: bool = False  # commands run in a new network namespace where the OS allows it

    def __post_init__(self) -> None:
        for name in ("command_timeout", "tool_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_output_chars < 100:
            raise ValueError(f"max_output_chars must be at least 100, got {self.max_output_chars}")
        if self.max_written_bytes < 1:
            raise ValueError(f"max_written_bytes must be positive, got {self.max_written_bytes}")


@dataclass(slots=True, frozen=True)
class ToolContext:
    """Injected into a tool that declares a parameter of this type; not part of its schema."""

    workspace: Path
    policy: Policy
    task: str = ""  # the process's input, where a model call is being prepared (TaskWord)


@dataclass(slots=True, frozen=True)
class ArgType:
    """What an argument means in the environment, beyond its JSON type. At each model call the
    kernel turns it into the call's schema (an `enum` of the real values, or a path pattern
    when they are too many: see `argtypes.py`), and `execute` checks it against the workspace
    as it is when the call runs. In the static schema it shows as `"x-llmos": kind`."""

    kind: str  # file | dir | new_path | command | argv | choices | task_word
    choices: Callable[[ToolContext], list[str]] | None = None  # kind "choices": computed per call

    def __post_init__(self) -> None:
        if self.kind not in ARG_KINDS:
            raise TypeError(f"ArgType kind must be one of {sorted(ARG_KINDS)}, got {self.kind!r}")
        if (self.kind == "choices") != (self.choices is not None):
            raise TypeError("ArgType: a 'choices' argument needs a choices function (only it)")


ARG_KINDS = {"file", "dir", "new_path", "command", "argv", "choices", "task_word"}
WorkspaceFile = Annotated[str, ArgType("file")]  # an existing file in the workspace
WorkspaceDir = Annotated[str, ArgType("dir")]  # an existing folder ("." is the workspace)
NewPath = Annotated[str, ArgType("new_path")]  # a path that does not exist yet
AllowedCommand = Annotated[str, ArgType("command")]  # a program on the policy's allow-list
CommandLine = Annotated[list[str], ArgType("argv")]  # argv whose argv[0] is allow-listed
# A word or quoted phrase of the process's task (a search query): the grammar admits only
# those, so a small model searches for what it was asked about; any text runs when called.
TaskWord = Annotated[str, ArgType("task_word")]


def Choices(fn: Callable[[ToolContext], list[str]]) -> Any:  # noqa: N802 - reads as a type
    """An enumeration computed at call time: `Annotated[str, ArgType("choices", fn)]`, where
    `fn(ctx)` returns the values admitted now."""
    return Annotated[str, ArgType("choices", fn)]


def arg_type_of(annotation: Any) -> ArgType | None:
    """The ArgType an annotation carries (`Optional[WorkspaceFile]` included), else None."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return arg_type_of(inner[0]) if len(inner) == 1 else None
    if typing.get_origin(annotation) is typing.Annotated:
        return next((a for a in typing.get_args(annotation)[1:] if isinstance(a, ArgType)), None)
    return None


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    read_only: bool = False
    context_param: str | None = None
    arg_types: dict[str, ArgType] = field(default_factory=dict, compare=False)
    validator: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            Validator.check_schema(self.parameters)
        except jsonschema.SchemaError as exc:
            why = exc.message
            raise TypeError(f"tool {self.name}: parameters is not a JSON schema: {why}") from None
        checker = Validator(self.parameters, format_checker=Validator.FORMAT_CHECKER)
        object.__setattr__(self, "validator", checker)

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def _schema_of(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:  # Annotated[str, {"format": "date"}]: extra schema keywords
        extra = [a for a in args[1:] if isinstance(a, dict)]
        typed = [{"x-llmos": a.kind} for a in args[1:] if isinstance(a, ArgType)]
        return _schema_of(args[0]) | {k: v for d in extra + typed for k, v in d.items()}
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
    """Make a function a tool: `@tool` or `@tool(read_only=True)`. The Tool is `fn.tool`; a
    program takes it by listing the function (or, in a program's .py file, its name)."""

    def make(f: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(f, include_extras=True)
        summary, docs = _doc_parts(f.__doc__ or "")
        props: dict[str, Any] = {}
        required: list[str] = []
        context_param = None
        arg_types: dict[str, ArgType] = {}
        for pname, param in inspect.signature(f).parameters.items():
            if hints.get(pname) is ToolContext:
                context_param = pname
                continue
            if pname not in hints:
                raise TypeError(f"@tool {f.__name__}: parameter {pname!r} needs a type hint")
            props[pname] = _schema_of(hints[pname]) | (
                {"description": docs[pname]} if pname in docs else {}
            )
            if (typed := arg_type_of(hints[pname])) is not None:
                arg_types[pname] = typed
            if param.default is inspect.Parameter.empty:
                required.append(pname)
        schema = {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }
        f.tool = Tool(  # type: ignore[attr-defined]
            name or f.__name__, summary, schema, f, read_only, context_param, arg_types
        )
        return f

    return make(fn) if fn is not None else make


def tool_of(value: Any) -> Tool | None:
    """The Tool a `@tool` function carries (or the Tool itself), else None."""
    if isinstance(value, Tool):
        return value
    t = getattr(value, "tool", None)
    return t if isinstance(t, Tool) else None
