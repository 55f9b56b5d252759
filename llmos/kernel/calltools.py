"""What one model call of a process needs around it: the tools it may call, their typed
arguments as the workspace has them now (`for_call`); a check that the backend's reply is a
well-formed ChatResult (`garbage`); and a thread of its own for each tool call (`in_thread`).
Split out of loop.py, which keeps only the plan → act → observe loop."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from llmos.backends.base import Backend, ChatResult, ToolCall, Usage
from llmos.kernel import argtypes, early
from llmos.kernel.process import Process, ToolCallStep
from llmos.kernel.tools import BUILTINS, Tool, ToolContext, ToolResult

T = TypeVar("T")
Syscall = Callable[[Process, ToolCall], Awaitable[ToolResult]]  # the kernel runs it, on its loop


async def run_call(
    ctx: Any, proc: Process, call: ToolCall, run: Callable[[], ToolResult]
) -> ToolResult:
    """One tool call of the turn just journaled: a kernel system call (spawn_agent, ...) on the
    kernel's loop, where the program's table has the built-in one; the result of its early
    start (early.py), where it had one; else `run()` in a thread of its own. `ctx` is the
    loop's Context (its `syscalls` and `early`)."""
    syscall = (ctx.syscalls or {}).get(call.name)
    if syscall is not None and proc.program.tool_table.get(call.name) is BUILTINS[call.name]:
        return await syscall(proc, call)
    started = ctx.early.take(call) if ctx.early is not None else None
    if started is not None:
        return await started
    return await in_thread(run)


def begin_early(ctx: Any, proc: Process, request: Any) -> None:
    """Before a model call: drop the last turn's unused early calls, start this turn's."""
    if ctx.early is not None:
        ctx.early.drop()
    ctx.early = early.begin(proc, ctx.store, request, in_thread)


def for_call(proc: Process, backend: Backend) -> list[dict[str, Any]]:
    """The program's tools for this model call, their typed arguments as the workspace has them
    now (an enum of the real files, ...), or plain strings for a program with typed_args off."""
    prog = proc.program
    table = prog.tool_table
    here = ToolContext(Path(proc.workspace), prog.policy, proc.input) if prog.typed_args else None
    enforced = bool(getattr(backend, "enforces_schema", False))
    tools = [argtypes.resolve(table[name], here, enforced) for name in prog.tools if name in table]
    return [_skip_made(proc, t, table[t["function"]["name"]]) for t in tools] if here else tools


def _skip_made(proc: Process, entry: dict[str, Any], tool: Tool) -> dict[str, Any]:
    """A read-only tool with one typed argument: the values it was already called with (and
    nothing else) go in `x-llmos-skip`, which the local grammar leaves out of the enum (the
    same read gives the same answer, and a small model otherwise repeats its first call) while
    the tool prompt, and so the conversation's cached KV, stays the same."""
    if not tool.read_only or len(tool.arg_types) != 1:
        return entry
    (name,) = tool.arg_types
    default = inspect.signature(tool.fn).parameters[name].default
    made: list[str] = []
    for step in proc.steps:
        if isinstance(step, ToolCallStep) and step.name == tool.name:
            try:
                args = json.loads(step.arguments or "{}")
            except json.JSONDecodeError:
                continue
            value = args.get(name, default) if isinstance(args, dict) else None
            if set(args) <= {name} and isinstance(value, str) and value not in made:
                made.append(value)
    props = entry["function"]["parameters"].get("properties", {})
    if not made or "enum" not in props.get(name, {}):
        return entry
    params = {**entry["function"]["parameters"]}
    params["properties"] = {**props, name: {**props[name], "x-llmos-skip": made}}
    return {**entry, "function": {**entry["function"], "parameters": params}}


def garbage(result: object) -> str | None:
    """Why a backend's reply is not a well-formed ChatResult (a backend bug, not the model's
    mistake: a model's unreadable text comes back as `malformed`), or None."""
    if not isinstance(result, ChatResult):
        return f"{type(result).__name__} instead of a ChatResult"
    if not isinstance(result.content, str | None):
        return f"content is a {type(result.content).__name__}"
    if not isinstance(result.tool_calls, list) or not all(
        isinstance(c, ToolCall)
        and isinstance(c.id, str)
        and isinstance(c.name, str)
        and isinstance(c.arguments, str)
        for c in result.tool_calls
    ):
        return "tool_calls is not a list of ToolCall(id, name, arguments: str)"
    u = result.usage
    if not isinstance(u, Usage) or not all(
        isinstance(n, int) and n >= 0
        for n in (u.prompt_tokens, u.cached_tokens, u.completion_tokens)
    ):
        return "usage is not a Usage of token counts"
    if not isinstance(result.engine_seconds, int | float) or not isinstance(result.raw, str):
        return "engine_seconds or raw has the wrong type"
    if not isinstance(result.malformed, str | None) or not isinstance(
        result.finish_reason, str | None
    ):
        return "malformed or finish_reason has the wrong type"
    return None


async def in_thread(fn: Callable[[], T]) -> T:
    """`fn()` in a thread of its own: hung tools (each abandoned after its timeout) can never
    use up a shared pool and starve the other processes' calls."""
    running = asyncio.get_running_loop()
    future: asyncio.Future[T] = running.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if future.cancelled():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def work() -> None:
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - our bug: raised in the loop, not lost
            running.call_soon_threadsafe(settle, None, exc)
        else:
            running.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=work, name="llmos-call", daemon=True).start()
    return await future
