"""The agent loop: plan (call the model) → act (system calls) → observe (results join the
transcript), as one `while` over a tagged union of next steps.

Guardrails: step, wall-time, token and cost limits; stuck detection (the same call with the
same arguments N times); one repair retry for unusable model output. Model mistakes and tool
failures become observations; our own bugs raise. Every step is committed before the next
model call, so a crashed run resumes from its transcript.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import jsonschema

from llmos.backends.base import Backend, ChatRequest, ChatResult, Message, ToolCall
from llmos.kernel import (
    calltools,
    evidence,
    guards,
    journal,
    memory,
    memory_policies,
    memory_tools,
    report,
    trace,
)
from llmos.kernel.meter import Meter
from llmos.kernel.process import (
    ApprovalStep,
    ErrorStep,
    FinalAnswer,
    ModelTurn,
    Process,
    Status,
    ToolCallStep,
    ToolResultStep,
)
from llmos.kernel.store import Store
from llmos.kernel.tools import ToolResult, execute


@dataclass(frozen=True, slots=True)
class CallModel:
    pass


@dataclass(frozen=True, slots=True)
class RunTools:
    calls: list[ToolCall]


@dataclass(frozen=True, slots=True)
class Answer:
    """The model answered on a turn that was not the answer turn (answer_turn "evidence"):
    the answer turn comes next."""


@dataclass(frozen=True, slots=True)
class Repair:
    what: str  # malformed_output | bad_answer
    why: str


@dataclass(frozen=True, slots=True)
class Finish:
    answer: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    kind: str  # a key of report.ADVICE
    reason: str


NextStep = CallModel | Answer | RunTools | Repair | Finish | GiveUp


@dataclass(slots=True)
class Context:
    backend: Backend
    store: Store
    meter: Meter
    decide: Callable[[Process, ToolCall], Awaitable[bool | None]]  # a person's approval
    killed: Callable[[Process], bool]
    paused: float = 0.0  # seconds spent waiting for a person: not the program's wall time
    detached: bool = False  # the kernel is shutting down: stop, but stay resumable
    syscalls: dict[str, calltools.Syscall] | None = None  # the kernel's own (spawn_agent, ...)
    budget: Callable[[Process], str | None] | None = None  # a process tree's shared budget
    early: calltools.early.EarlyCalls | None = None  # read-only calls started before the turn ends


@trace.agent_run  # the invoke_agent span
async def run(proc: Process, ctx: Context) -> None:
    """Run (or resume) a process until it stops. Sets its status, answer or report."""
    started, base = time.monotonic(), proc.elapsed
    step: NextStep = resume_point(proc)
    try:
        while True:
            proc.elapsed = base + time.monotonic() - started - ctx.paused
            if isinstance(step, CallModel | Answer):
                step = await plan(proc, ctx, answer=isinstance(step, Answer))
            elif isinstance(step, RunTools):
                step = await act(proc, ctx, step.calls)
            elif isinstance(step, Repair):
                journal.append(ctx.store, proc, ErrorStep(step.what, step.why))
                step = CallModel()
            elif isinstance(step, Finish):
                proc.status, proc.answer, proc.reason = Status.DONE, step.answer, "done"
                journal.append(ctx.store, proc, FinalAnswer(step.answer))
                break
            elif isinstance(step, GiveUp):
                give_up(proc, ctx, step)
                break
            else:
                raise AssertionError(f"unknown next step {step!r}")
    except asyncio.CancelledError:
        if not ctx.detached:
            give_up(proc, ctx, GiveUp("killed", "killed by a person (kill)"))
    journal.save_status(ctx.store, proc)


def give_up(proc: Process, ctx: Context, step: GiveUp) -> None:
    proc.status = Status.KILLED if step.kind == "killed" else Status.FAILED
    proc.reason = step.reason
    journal.append(ctx.store, proc, ErrorStep(step.kind, step.reason))
    proc.report = report.build(proc, step.kind, step.reason)


def resume_point(proc: Process) -> NextStep:
    if proc.pending_calls():
        return RunTools(proc.pending_calls())
    if proc.steps and isinstance(proc.steps[-1], ModelTurn):
        return classify(proc, proc.steps[-1])
    return CallModel()


def retain_key(proc: Process) -> str:
    """The key under which the backend keeps a process's conversation cached between turns."""
    return f"p{proc.pid}"


def check_limits(proc: Process, ctx: Context) -> GiveUp | None:
    lim = proc.program.limits
    if ctx.killed(proc):
        return GiveUp("killed", "killed by a person (kill)")
    if proc.num_turns >= lim.max_steps:
        return GiveUp(
            "step_limit",
            f"step limit: {proc.num_turns} model turns of {lim.max_steps}, with no final answer",
        )
    if proc.elapsed >= lim.max_seconds:
        return GiveUp("time_limit", f"time limit: {proc.elapsed:.1f}s of {lim.max_seconds:g}s")
    why = ctx.meter.over_budget(proc.owner, proc.usage, lim)  # summaries count too
    if why is None and ctx.budget is not None:
        why = ctx.budget(proc)
    return GiveUp("budget", why) if why else None


async def plan(proc: Process, ctx: Context, answer: bool = False) -> NextStep:
    stop = check_limits(proc, ctx)
    if stop is not None:
        return stop
    refused = await guards.task_input(ctx, proc)  # input guards, before the first call
    if refused is not None:
        return GiveUp("guard", refused)
    prog = proc.program
    tools = calltools.for_call(proc, ctx.backend) + memory_tools.schemas(proc)
    choice = "none" if answer else (prog.tool_choice_for(proc.num_turns) if tools else "none")
    names = {t["function"]["name"] for t in tools}
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        choice = "required"  # the named tool is not in the table (a custom tool not loaded)
    answering = choice == "none" and bool(prog.tools) and _has_results(proc)
    if answering and prog.answer_turn == "evidence":
        # a fresh prompt: the focused evidence, then the task (no tools, no history)
        tools = []
        msgs: list[Message] = [
            {"role": "system", "content": memory.system_prompt(proc)},
            {"role": "user", "content": evidence.answer_prompt(proc)},
        ]
    else:
        msgs = memory.to_messages(proc)
        if answering:  # the task again, after what the tools returned
            msgs = [*msgs, {"role": "user", "content": memory.ANSWER.format(task=proc.input)}]
    if ctx.backend.context_window:
        room = ctx.backend.context_window - int(prog.sampling.get("max_tokens") or 256) - 8
        try:  # what the memory manager did to fit is a transcript step (memory_policies)
            msgs = await memory_policies.fit_call(proc, ctx, msgs, tools, room)
        except memory.ContextOverflow as exc:
            return GiveUp("context", f"context window: {exc}")
    request = ChatRequest(
        msgs,
        tools,
        choice,
        guards.sampling(proc, ctx.backend),  # with its output guards, for a local engine
        proc.priority,
        proc.owner,
        f"p{proc.pid}-s{len(proc.steps)}",
        retain=retain_key(proc),
    )
    proc.status = Status.RUNNING
    journal.save_status(ctx.store, proc)
    calltools.begin_early(ctx, proc, request)  # read-only calls start as the stream allows
    chat_for = getattr(ctx.backend, "chat_for", None)  # a cascade checks against the program
    call = chat_for(request, proc) if chat_for else ctx.backend.chat(request)
    call = trace.chat(call, request, ctx.backend, proc)  # the chat span
    try:
        result = await asyncio.wait_for(call, max(0.01, prog.limits.max_seconds - proc.elapsed))
    except TimeoutError:
        return GiveUp(
            "time_limit", f"time limit: {prog.limits.max_seconds:g}s ran out during a model call"
        )
    except Exception as exc:  # noqa: BLE001 - a failed backend stops the run with a report
        return GiveUp("backend", f"backend {ctx.backend.name} failed: {type(exc).__name__}: {exc}")
    garbage = calltools.garbage(result)
    if garbage is not None:
        return GiveUp("backend", f"backend {ctx.backend.name} returned garbage: {garbage}")
    for judged in ctx.meter.judge_steps(ctx.backend, result):  # a cascade's judge: metered
        journal.append(ctx.store, proc, judged, model=judged.backend)
    for attempt in getattr(result, "attempts", ()):  # a cascade's rejected tries: steps too
        _journal_attempt(proc, ctx, attempt.result, attempt.reason, answering)
    turn = _turn(ctx, result, answering)  # who answered, priced by its own price
    journal.append(ctx.store, proc, turn, model=turn.backend)
    return classify(proc, turn)


def _journal_attempt(
    proc: Process, ctx: Context, result: ChatResult, reason: str, answering: bool
) -> None:
    """A rejected attempt: its own turn, metered to the backend that made it, then why it
    failed (the projection shows both, as the cascade's next ask saw them)."""
    turn = _turn(ctx, result, answering, malformed=f"rejected by the cascade: {reason}")
    journal.append(ctx.store, proc, turn, model=turn.backend)
    journal.append(ctx.store, proc, ErrorStep("bad_answer", reason))


def _turn(
    ctx: Context, result: ChatResult, answering: bool, malformed: str | None = None
) -> ModelTurn:
    """The transcript step of a model call, metered to the backend that answered."""
    u = result.usage
    return ModelTurn(
        result.content,
        result.tool_calls,
        result.raw,
        u.prompt_tokens,
        u.cached_tokens,
        u.completion_tokens,
        result.engine_seconds,
        ctx.meter.price_for(ctx.backend, result).cost(result),
        result.finish_reason,
        malformed or result.malformed,
        answering,
        result.backend or ctx.backend.name,
    )


def _has_results(proc: Process) -> bool:
    return any(isinstance(s, ToolResultStep) for s in proc.steps)


def classify(proc: Process, turn: ModelTurn) -> NextStep:
    """What the model's turn asks for next."""
    if (
        proc.program.answer_turn == "evidence"
        and not turn.answering
        and not turn.tool_calls
        and not turn.malformed
        and _has_results(proc)
    ):  # a draft answer: the answer turn writes it from the evidence
        return Answer()
    problem = _problem(proc, turn)
    if problem is None:
        if turn.tool_calls:
            return RunTools(turn.tool_calls)
        error = _restated_error(proc, turn)
        if error is not None:
            return Repair("restated_error", error)
        return Finish((turn.content or "").strip())
    what, why = problem
    previous = [s for s in proc.steps[:-1] if isinstance(s, ModelTurn | ToolResultStep)]
    if previous and isinstance(previous[-1], ModelTurn) and _problem(proc, previous[-1]):
        return GiveUp("malformed", f"the model's output was unusable twice in a row: {why}")
    return Repair(what, why)


_ERROR_WORDS = ("error", "refused", "does not exist", "not exist", "no such", "not found")


def _restated_error(proc: Process, turn: ModelTurn) -> str | None:
    """The failed call's error, when the answer only restates it (its last tool result failed,
    and the answer talks of the error or is mostly the error's words); once per process."""
    if any(isinstance(s, ErrorStep) and s.what == "restated_error" for s in proc.steps):
        return None
    results = [s for s in proc.steps if isinstance(s, ToolResultStep)]
    if not results or results[-1].ok:
        return None
    error, text = results[-1].error or "", (turn.content or "").lower()
    words = set(re.findall(r"[a-z0-9_.]+", text))
    shared = len(words & set(re.findall(r"[a-z0-9_.]+", error.lower()))) / max(1, len(words))
    return error if any(w in text for w in _ERROR_WORDS) or shared >= 0.5 else None


def _problem(proc: Process, turn: ModelTurn) -> tuple[str, str] | None:
    guarded = guards.answer_problem(proc, turn)  # an output guard stopped or blocks it
    if guarded is not None:
        return guarded
    if turn.malformed:
        return "malformed_output", turn.malformed
    if turn.tool_calls:
        return None
    text = (turn.content or "").strip()
    if not text:
        return "malformed_output", "the reply was empty"
    schema = proc.program.output_schema
    if schema is not None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return "bad_answer", f"the final answer is not JSON ({exc.msg})"
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            return "bad_answer", f"the final answer does not match the schema: {exc.message}"
    return None


async def act(proc: Process, ctx: Context, calls: list[ToolCall]) -> NextStep:
    policy, lim, table = proc.program.policy, proc.program.limits, proc.program.tool_table
    started = {s.call_id for s in proc.steps if isinstance(s, ToolCallStep)}
    done = {s.call_id for s in proc.steps if isinstance(s, ToolResultStep)}
    for call in calls:
        if call.id in done:
            continue
        if ctx.killed(proc):
            return GiveUp("killed", "killed by a person (kill)")
        if call.id in started:  # it was running when the kernel stopped
            tool = table.get(call.name)
            if tool is None or not (tool.read_only or call.name in (ctx.syscalls or {})):
                _observe(
                    ctx,
                    proc,
                    call,
                    ToolResult(
                        False,
                        error=(
                            "interrupted: the kernel stopped while this call ran; it may or may "
                            "not have taken effect. Check before repeating it."
                        ),
                    ),
                )
                continue
        elif _times_requested(proc, call) >= lim.stuck_after:
            return GiveUp(
                "stuck",
                f"stuck: {call.name}({call.arguments}) was requested "
                f"{lim.stuck_after} times with the same arguments",
            )
        if call.name in policy.needs_approval:
            allow = await _approval(proc, ctx, call)
            if not allow:
                _observe(
                    ctx, proc, call, ToolResult(False, error=("refused: a person denied this call"))
                )
                continue
        if call.id not in started:
            proc.status = Status.WAITING_TOOL
            journal.append(ctx.store, proc, ToolCallStep(call.id, call.name, call.arguments))
        if memory_tools.handles(proc, call.name):  # memory syscalls: the kernel's own store
            _observe(ctx, proc, call, memory_tools.run(ctx.store, proc, call))
            continue
        run = functools.partial(execute, call.name, call.arguments, proc.workspace, policy)
        work = calltools.run_call(ctx, proc, call, functools.partial(run, table=table))
        result = await trace.tool(work, call, proc)  # the execute_tool span
        result, stop = await guards.tool_output(ctx, proc, call.name, result)  # before the model
        _observe(ctx, proc, call, result)
        if stop is not None:
            return GiveUp("guard", stop)
    proc.status = Status.RUNNING
    return CallModel()


def _observe(ctx: Context, proc: Process, call: ToolCall, result: ToolResult) -> None:
    journal.append(
        ctx.store,
        proc,
        ToolResultStep(call.id, call.name, result.ok, result.output, result.error, result.sha256),
    )


def _times_requested(proc: Process, call: ToolCall) -> int:
    key = (call.name, _canonical(call.arguments))
    return sum(
        1
        for s in proc.steps
        if isinstance(s, ModelTurn)
        for c in s.tool_calls
        if (c.name, _canonical(c.arguments)) == key
    )


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except json.JSONDecodeError:
        return arguments


async def _approval(proc: Process, ctx: Context, call: ToolCall) -> bool:
    if any(isinstance(s, ApprovalStep) and s.call_id == call.id for s in proc.steps):
        return next(
            s.allow for s in proc.steps if isinstance(s, ApprovalStep) and s.call_id == call.id
        )
    proc.status = Status.WAITING_APPROVAL
    journal.save_status(ctx.store, proc)
    t0 = time.monotonic()
    allow = await ctx.decide(proc, call)
    while allow is None:  # decide() returns None only when asked to re-check
        allow = await ctx.decide(proc, call)
    ctx.paused += time.monotonic() - t0
    journal.append(ctx.store, proc, ApprovalStep(call.id, allow))
    return allow
