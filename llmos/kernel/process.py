"""A process: one run of a program. Its transcript is a list of typed steps, and everything
else (the prompt, the usage, the give-up report) is derived from it."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from llmos.backends.base import ToolCall
from llmos.kernel.program import Program


class Status(enum.Enum):
    READY = "ready"
    RUNNING = "running"
    WAITING_TOOL = "waiting_tool"
    WAITING_APPROVAL = "waiting_approval"
    DONE = "done"
    FAILED = "failed"
    KILLED = "killed"

    @property
    def finished(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.KILLED)


@dataclass(slots=True)
class ModelTurn:
    kind: ClassVar[str] = "model_turn"
    content: str | None
    tool_calls: list[ToolCall]
    raw: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    cost: float = 0.0
    finish_reason: str | None = None
    malformed: str | None = None
    answering: bool = False  # the answer turn (tool_choice "none" after tool results)
    backend: str | None = None  # the backend that answered (a pool's member), as metered


@dataclass(slots=True)
class JudgeCall:
    """A cascade's judge model rating an answer: not a turn of the conversation (the prompt
    never shows it), but tokens the process caused, metered to the judge's backend."""

    kind: ClassVar[str] = "judge"
    verdict: str | None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    cost: float = 0.0
    backend: str | None = None


@dataclass(slots=True)
class ToolCallStep:
    """Written just before the call runs: a call without a result was interrupted."""

    kind: ClassVar[str] = "tool_call"
    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ToolResultStep:
    kind: ClassVar[str] = "tool_result"
    call_id: str
    name: str
    ok: bool
    output: str
    error: str | None
    sha256: str

    def observation(self) -> str:
        return self.output if self.ok else f"error: {self.error}"


@dataclass(slots=True)
class ApprovalStep:
    kind: ClassVar[str] = "approval"
    call_id: str
    allow: bool


@dataclass(slots=True)
class ErrorStep:
    """Something went wrong that the model should hear about (or that stopped the run)."""

    kind: ClassVar[str] = "error"
    what: str  # malformed_output, backend, interrupted, limit, ...
    message: str


@dataclass(slots=True)
class FinalAnswer:
    kind: ClassVar[str] = "final_answer"
    text: str


Step = (
    ModelTurn | JudgeCall | ToolCallStep | ToolResultStep | ApprovalStep | ErrorStep | FinalAnswer
)
METERED_STEPS: tuple[type, ...] = (ModelTurn, JudgeCall)  # steps whose tokens are metered


def register_step(cls: type, *, metered: bool = False) -> None:
    """Add a step kind from another kernel module (memory's compactions and summaries): it
    loads from the journal, and with `metered` its tokens count in `Process.usage`."""
    global METERED_STEPS
    STEP_TYPES.setdefault(cls.kind, cls)  # type: ignore[attr-defined]
    if metered and cls not in METERED_STEPS:
        METERED_STEPS = (*METERED_STEPS, cls)


STEP_TYPES: dict[str, type] = {
    t.kind: t
    for t in (
        ModelTurn,
        JudgeCall,
        ToolCallStep,
        ToolResultStep,
        ApprovalStep,
        ErrorStep,
        FinalAnswer,
    )
}


def step_to_json(step: Step) -> str:
    return json.dumps(asdict(step))


def step_from_json(kind: str, data: str) -> Step:
    values: dict[str, Any] = json.loads(data)
    if kind == ModelTurn.kind:
        values["tool_calls"] = [ToolCall(**c) for c in values["tool_calls"]]
    cls = STEP_TYPES[kind]
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass(slots=True)
class ProcessUsage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, turn: ModelTurn | JudgeCall) -> None:
        self.prompt_tokens += turn.prompt_tokens
        self.cached_tokens += turn.cached_tokens
        self.completion_tokens += turn.completion_tokens
        self.engine_seconds += turn.engine_seconds
        self.cost += turn.cost


@dataclass(slots=True)
class Process:
    pid: int
    program: Program
    input: str
    workspace: str
    owner: str | None = None
    priority: int = 0
    status: Status = Status.READY
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    report: dict[str, Any] | None = None  # the give-up report, for every stop but success
    reason: str | None = None  # why it stopped, in one line
    created_at: float = 0.0
    elapsed: float = 0.0  # wall seconds spent running, over every resume
    parent: int | None = None  # the process that spawned it (a sub-agent), else None

    @property
    def usage(self) -> ProcessUsage:
        u = ProcessUsage()
        for s in self.steps:
            if isinstance(s, METERED_STEPS):
                u.add(s)
        return u

    @property
    def num_turns(self) -> int:
        return sum(isinstance(s, ModelTurn) for s in self.steps)

    def pending_calls(self) -> list[ToolCall]:
        """Calls of the last model turn that have no result yet (what a resume must do)."""
        last = next(
            (i for i in range(len(self.steps) - 1, -1, -1) if isinstance(self.steps[i], ModelTurn)),
            None,
        )
        if last is None:
            return []
        turn = self.steps[last]
        assert isinstance(turn, ModelTurn)
        done = {s.call_id for s in self.steps[last:] if isinstance(s, ToolResultStep)}
        return [c for c in turn.tool_calls if c.id not in done]
