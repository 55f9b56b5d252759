"""The wire format of the kernel over HTTP: `/v1/processes` and `/v1/usage`.

Objects carry an `object` tag as OpenAI's do; lists are `{"object": "list", "data": [...]}`.
Unknown request fields are refused (400, naming the field): a misspelt `workspace` must not
silently run a process somewhere else.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmos.kernel.process import Process, Status


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SpawnRequest(_Strict):
    program: str | dict[str, Any] = Field(
        "assistant",
        description="A program registered on the server (by name), or an inline program spec "
        "(the fields of a YAML program: name, system_prompt, tools, policy, limits, ...).",
    )
    input: str = Field("", description="The process's input: its task.", max_length=1_000_000)
    workspace: str | None = Field(
        None,
        description="The folder its tools work in, relative to the server's workspace root "
        "(or absolute inside it). Default: a new empty folder under the root.",
        max_length=4096,
    )
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")


class ApproveRequest(_Strict):
    call_id: str = Field(..., min_length=1, max_length=256)
    allow: bool = True


class BudgetRequest(_Strict):
    user: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=0, le=2**63 - 1)
    max_cost: float | None = Field(None, ge=0)


class ProcessUsageInfo(BaseModel):
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    engine_seconds: float = 0.0
    cost: float = 0.0


class PendingApproval(BaseModel):
    call_id: str
    name: str
    arguments: str


class StepInfo(BaseModel):
    """One step of the transcript: its kind and the step's own fields."""

    model_config = ConfigDict(extra="allow")
    seq: int
    kind: str
    created_at: float


class Transcript(BaseModel):
    offset: int
    limit: int
    total: int
    steps: list[StepInfo]


class ProcessInfo(BaseModel):
    object: Literal["process"] = "process"
    pid: int
    program: str
    program_version: str
    owner: str | None
    status: str
    input: str
    workspace: str
    priority: int
    answer: str | None
    reason: str | None
    report: dict[str, Any] | None = None
    created_at: float
    updated_at: float
    elapsed: float
    steps: int
    usage: ProcessUsageInfo
    pending_approvals: list[PendingApproval] = []
    transcript: Transcript | None = None


class ProcessList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ProcessInfo]


class UsageRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    calls: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    engine_seconds: float
    cost: float


class Budget(BaseModel):
    user: str
    max_tokens: int | None
    max_cost: float | None
    used_tokens: int = 0
    used_cost: float = 0.0


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    user: str | None = Field(description="Whose usage this is; null: everyone's (an admin).")
    by_user: list[UsageRow]
    by_program: list[UsageRow]
    budgets: list[Budget]


# -- building them from the store ---------------------------------------------------------


def step_info(seq: int, kind: str, data: str, created_at: float) -> StepInfo:
    return StepInfo(seq=seq, kind=kind, created_at=created_at, **json.loads(data))


def pending_approvals(proc: Process) -> list[PendingApproval]:
    """The calls waiting for a person: of the last model turn, needing approval, undecided."""
    if proc.status is not Status.WAITING_APPROVAL:
        return []
    decided = {s.call_id for s in proc.steps if getattr(s, "kind", "") == "approval"}
    needs = set(proc.program.policy.needs_approval)
    return [
        PendingApproval(call_id=c.id, name=c.name, arguments=c.arguments)
        for c in proc.pending_calls()
        if c.name in needs and c.id not in decided
    ]


def summary(
    row: Any,
    usage: dict[str, Any],
    steps: int,
    pending: list[PendingApproval],
    transcript: Transcript | None,
) -> ProcessInfo:
    tokens = {k: usage.get(k) or 0 for k in ("prompt_tokens", "cached_tokens", "completion_tokens")}
    return ProcessInfo(
        pid=row["pid"],
        program=row["program_name"],
        program_version=row["program_version"],
        owner=row["owner"],
        status=row["status"],
        input=row["input"],
        workspace=row["workspace"],
        priority=row["priority"],
        answer=row["answer"],
        reason=row["reason"],
        report=json.loads(row["report"]) if row["report"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        elapsed=row["elapsed"],
        steps=steps,
        usage=ProcessUsageInfo(
            **tokens,
            total_tokens=tokens["prompt_tokens"] + tokens["completion_tokens"],
            engine_seconds=usage.get("engine_seconds") or 0.0,
            cost=usage.get("cost") or 0.0,
        ),
        pending_approvals=pending,
        transcript=transcript,
    )
