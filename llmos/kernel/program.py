"""Programs: declarative agent specs, in YAML or Python. A program names its system prompt
(versioned), its model (a backend name), its tools and policy, its limits, an optional output
schema and its sampling settings. A process is one run of a program."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from llmos.engine.guards import parse_guards
from llmos.kernel.memory_config import MemoryConfig
from llmos.kernel.router import CascadeConfig
from llmos.kernel.tools import Policy, Tool, table, tool_of


class ProgramError(ValueError):
    """A program file or spec that cannot be used; the message names the field."""


@dataclass(slots=True)
class Limits:
    max_steps: int = 12  # model turns
    max_seconds: float = 600.0  # wall time, over every resume
    max_tokens: int | None = 200_000  # prompt + completion, over the process
    max_cost: float | None = None
    stuck_after: int = 3  # the same call with the same arguments this many times: stuck
    max_children: int = 64  # sub-agents it may spawn in all (spawn_agent, map_agents)
    max_parallel_children: int = 16  # of them running at once (map_agents waits for a slot)

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "max_seconds",
            "stuck_after",
            "max_children",
            "max_parallel_children",
        ):
            if getattr(self, name) <= 0:
                raise ProgramError(f"limits.{name} must be positive, got {getattr(self, name)}")


@dataclass(slots=True)
class Program:
    name: str = "assistant"
    system_prompt: str = "You are a helpful assistant."
    version: str = "1"
    model: str | None = None  # a backend name; None: the kernel's default backend
    tools: list[str] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    limits: Limits = field(default_factory=Limits)
    output_schema: dict[str, Any] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    # "auto", "required", "none" or a tool's name; a list gives one per model turn, its last
    # one repeating (["required", "auto"]: a small model must look before it answers)
    tool_choice: str | list[str] = "auto"
    # Tool arguments typed by the environment (an existing file, ...) become each call's
    # schema: the grammar admits only real paths. False: plain strings (checked when run).
    typed_args: bool = True
    # How the answer turn after tool results reads: "chat" (the conversation, the task again)
    # or "evidence" (a fresh prompt: the lines the tools returned that bear on the task, then
    # the task; no tools, no history: see evidence.py). With "evidence" an answer the model
    # writes on another turn is its signal to stop calling tools, and the answer turn follows.
    answer_turn: str = "chat"
    summarize: bool = False  # summarize what trimming drops from the context, else elide it
    # The memory policy: trim | summarize | page, or a mapping of memory_config.MemoryConfig
    memory: dict[str, Any] | str = field(default_factory=dict)
    # Start each read-only call of a turn as soon as its arguments are complete in the stream
    # (writes still wait for the turn's end and approval). The transcript is the same either way.
    stream_tools: bool = True
    # While the model decides, pre-run the read-only calls it made at this turn the last time
    # this program ran on the same input; a wrong guess is discarded (no tokens, no step).
    speculate_tools: bool = False
    # Safeguards at the input, tool_output and output stages (llmos/kernel/guards.py): guard
    # objects as in `llmos serve --guards`, e.g. {name, stage: tool_output, kind: classifier}
    guards: list[Any] = field(default_factory=list)
    # The checks a `cascade:[...]` model runs before it escalates (router.CascadeConfig's fields)
    cascade: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the .py file that defines it (its custom tools)
    # The program's own tools (@tool functions listed in `tools`, or defined in its .py file);
    # not stored: a process loaded from the store has only their names until it runs again.
    own_tools: dict[str, Tool] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.policy, dict):
            self.policy = _build(Policy, self.policy, "policy")
        if isinstance(self.limits, dict):
            self.limits = _build(Limits, self.limits, "limits")
        self.version = str(self.version)
        names = []
        for entry in self.tools:
            t = tool_of(entry)
            if t is not None:
                self.own_tools[t.name] = t
            elif not isinstance(entry, str):
                raise ProgramError(f"tools: {entry!r} is neither a tool name nor a @tool function")
            names.append(t.name if t is not None else entry)
        self.tools = names
        if self.policy.allowed_tools is None:
            self.policy.allowed_tools = list(self.tools)
        choices = [self.tool_choice] if isinstance(self.tool_choice, str) else self.tool_choice
        bad = [c for c in choices if c not in ("auto", "required", "none", *self.tools)]
        if not choices or bad:
            raise ProgramError(
                f"tool_choice: {bad or choices} must be 'auto', 'required', "
                f"'none' or one of the program's tools {self.tools}"
            )
        if self.answer_turn not in ("chat", "evidence"):
            raise ProgramError(
                f"answer_turn must be 'chat' or 'evidence', got {self.answer_turn!r}"
            )
        if not isinstance(self.sampling, dict):
            raise ProgramError("sampling must be a mapping like {temperature: 0}")
        try:
            CascadeConfig.from_dict(self.cascade)
        except (TypeError, ValueError) as exc:
            raise ProgramError(str(exc)) from None
        try:
            MemoryConfig.from_dict(self.memory)
        except (TypeError, ValueError) as exc:
            raise ProgramError(str(exc)) from None
        try:
            parse_guards(self.guards)
        except ValueError as exc:
            raise ProgramError(str(exc)) from None

    @property
    def memory_config(self) -> MemoryConfig:
        return MemoryConfig.from_dict(self.memory)

    def tool_choice_for(self, turn: int) -> str | dict[str, Any]:
        choices = [self.tool_choice] if isinstance(self.tool_choice, str) else self.tool_choice
        choice = choices[min(turn, len(choices) - 1)]
        if choice in ("auto", "required", "none"):
            return choice
        return {"type": "function", "function": {"name": choice}}

    @property
    def prompt_hash(self) -> str:
        """Identifies the exact system prompt a process ran with, beside its version."""
        return hashlib.sha256(self.system_prompt.encode()).hexdigest()[:12]

    @property
    def tool_table(self) -> dict[str, Tool]:
        """The tools its calls can reach: the built-ins plus its own."""
        return table(self.own_tools.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: asdict(v) if is_dataclass(v) else v
            for f in fields(self)
            if f.name != "own_tools"
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Program:
        return _build(cls, data, "program")

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Program:
        """A `.yaml`/`.yml`/`.json` spec, or a `.py` file that defines `program = Program(...)`."""
        path = Path(path)
        if not path.is_file():
            raise ProgramError(f"program file {str(path)!r} does not exist")
        if path.suffix == ".py":
            return _load_python(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ProgramError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ProgramError(f"{path}: a program is a mapping of fields")
        return cls.from_dict(data)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls) if f.name != "own_tools"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProgramError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ProgramError(f"{where}: {exc}") from None


def _load_python(path: Path) -> Program:
    name = f"llmos_program_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        module = sys.modules[name]
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    program = getattr(module, "program", None)
    if not isinstance(program, Program):
        raise ProgramError(f"{path}: define `program = Program(...)` at module level")
    program.source = str(path.resolve())
    own = {t.name: t for t in map(tool_of, vars(module).values()) if t is not None}
    program.own_tools = {**own, **program.own_tools}
    return program
