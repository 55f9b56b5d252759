"""Sub-agents: fork and join as system calls. `spawn_agent(program, input)` starts a child and
returns its pid, `wait_agents(pids)` joins them, and `map_agents(program, inputs)` runs one
program over many inputs, at most `limits.max_parallel_children` at once.

A child shares its parent's user, priority and budget (one budget for the whole tree, charged
where the root's limits say: never multiplied), and its own program's limits apply to it too.
Each spawn has a stable key (the parent's pid, the call's id, the input's index) and its row is
made under that key in one transaction: a fork that resumes after a crash finds the children it
already made, resumes the unfinished ones, and spawns only the missing ones."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.backends.base import ToolCall
from llmos.kernel import journal, sandbox
from llmos.kernel.process import Process
from llmos.kernel.program import Program, ProgramError
from llmos.kernel.sandbox import Refused
from llmos.kernel.tools import ToolResult, check_args

if TYPE_CHECKING:
    from llmos.kernel.kernel import Kernel

Syscall = Callable[[Process, ToolCall], Awaitable[ToolResult]]
MAX_DEPTH = 4  # a child's child's ... : deeper forks are refused (no fork bombs)
POLL = 0.25  # seconds between looks at a child run elsewhere, and at the parent's kill flag
PROGRAM_SUFFIXES = (".yaml", ".yml", ".json")


class Children:
    """The fork/join system calls of one kernel, run on its event loop."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.store = kernel.store

    def syscalls(self) -> dict[str, Syscall]:
        return {
            "spawn_agent": self.spawn_agent,
            "wait_agents": self.wait_agents,
            "map_agents": self.map_agents,
        }

    # -- the system calls -----------------------------------------------------------------
    async def spawn_agent(self, proc: Process, call: ToolCall) -> ToolResult:
        try:
            args = _args(proc, call)
            program = self._program(proc, args["program"])
            self._check_room(proc, call, 1)
            pid = self._spawn(proc, program, args["input"], f"{proc.pid}/{call.id}/0")
        except Refused as exc:
            return ToolResult(False, error=f"refused: {exc}")
        return ToolResult(True, json.dumps({"pid": pid}))

    async def wait_agents(self, proc: Process, call: ToolCall) -> ToolResult:
        try:
            args = _args(proc, call)
            mine = set(journal.children(self.store, proc.pid))
            strangers = [p for p in args["pids"] if p not in mine]
            if strangers:
                raise Refused(f"wait_agents: pids {strangers} are not children of this process")
            if args.get("timeout", 300.0) <= 0:
                raise Refused("wait_agents: argument 'timeout' must be positive")
            for pid in args["pids"]:  # after a crash a child may be stopped: run it again
                self._resume(pid)
        except Refused as exc:
            return ToolResult(False, error=f"refused: {exc}")
        deadline = self._deadline(proc, args.get("timeout", 300.0))
        done = await asyncio.gather(*(self._joined(proc, p, deadline) for p in args["pids"]))
        return ToolResult(True, json.dumps([_summary(c) for c in done]))

    async def map_agents(self, proc: Process, call: ToolCall) -> ToolResult:
        try:
            args = _args(proc, call)
            program = self._program(proc, args["program"])
            inputs: list[str] = args["inputs"]
            if not inputs:
                raise Refused("map_agents: argument 'inputs' must name at least one input")
            self._check_room(proc, call, len(inputs))
        except Refused as exc:
            return ToolResult(False, error=f"refused: {exc}")
        slots = asyncio.Semaphore(proc.program.limits.max_parallel_children)
        deadline = self._deadline(proc, None)

        async def one(i: int, text: str) -> Process:
            async with slots:
                pid = self._spawn(proc, program, text, f"{proc.pid}/{call.id}/{i}")
                return await self._joined(proc, pid, deadline)

        done = await asyncio.gather(*(one(i, t) for i, t in enumerate(inputs)))
        return ToolResult(True, json.dumps([_summary(c) for c in done]))

    # -- budget ---------------------------------------------------------------------------
    def tree_budget(self, proc: Process) -> str | None:
        """Why the tree `proc` belongs to has spent its root's budget, or None. Every process
        of the tree checks it before each model call."""
        root = journal.root_of(self.store, proc.pid)
        if root == proc.pid and not journal.children(self.store, proc.pid):
            return None  # no tree: the process's own check is the whole check
        lim = self.kernel.get(root).program.limits
        tokens, cost = journal.tree_usage(self.store, root)
        if lim.max_tokens is not None and tokens >= lim.max_tokens:
            return (
                f"token budget: process {root} and its sub-agents used {tokens} tokens of "
                f"{lim.max_tokens} (sub-agents share their parent's budget)"
            )
        if lim.max_cost is not None and cost >= lim.max_cost:
            return (
                f"cost budget: process {root} and its sub-agents spent ${cost:.6f} of "
                f"${lim.max_cost} (sub-agents share their parent's budget)"
            )
        return None

    # -- internals ------------------------------------------------------------------------
    def _program(self, proc: Process, name: str) -> Program:
        """ "self", a .yaml/.json program in the workspace, or a program file beside the
        parent's own .py program (trusted as the parent is). A model may write files in the
        workspace, so a .py program there (its code would run) is refused."""
        if name in ("self", proc.program.name):
            return proc.program
        here = Path(proc.program.source).parent if proc.program.source else None
        if here is not None and (here / name).is_file() and "/" not in name.replace("\\", "/"):
            path = here / name
        else:
            if not name.endswith(PROGRAM_SUFFIXES):
                raise Refused(
                    f"argument 'program': {name!r} is neither 'self' nor a program file "
                    f"({', '.join(PROGRAM_SUFFIXES)}) in the workspace"
                )
            path = sandbox.resolve(Path(proc.workspace), name, field="program")
        try:
            program = Program.load(path)
            self.kernel.check_program(program)
        except ProgramError as exc:
            raise Refused(f"argument 'program': {exc}") from None
        return program

    def _check_room(self, proc: Process, call: ToolCall, n: int) -> None:
        if _depth(self.store, proc.pid) >= MAX_DEPTH:
            raise Refused(f"sub-agents nest at most {MAX_DEPTH} deep")
        mine = f"{proc.pid}/{call.id}/"
        rows = self.store.query("SELECT spawn_key FROM processes WHERE parent_pid = ?", (proc.pid,))
        others = sum(1 for r in rows if not (r[0] or "").startswith(mine))
        cap = proc.program.limits.max_children
        if others + n > cap:
            raise Refused(
                f"limits.max_children: this process has {others} sub-agents and asked for "
                f"{n} more, of {cap}"
            )

    def _spawn(self, proc: Process, program: Program, input: str, key: str) -> int:
        """The child under `key`: made now, or found (and resumed) when it already exists."""
        k = self.kernel
        backend = k.backend_for(program)
        pid = journal.create(
            self.store,
            program,
            input,
            proc.workspace,
            proc.owner,
            proc.priority,
            backend.name,
            parent=proc.pid,
            key=key,
        )
        self._resume(pid, program)
        return pid

    def _resume(self, pid: int, program: Program | None = None) -> None:
        from llmos.kernel.kernel import KernelError  # the kernel imports this module

        try:
            self.kernel.resume(pid, program)
        except KernelError as exc:
            raise Refused(str(exc)) from None

    def _deadline(self, proc: Process, timeout: float | None) -> float:
        left = proc.program.limits.max_seconds - proc.elapsed
        return time.monotonic() + (left if timeout is None else min(timeout, left))

    async def _joined(self, proc: Process, pid: int, deadline: float) -> Process:
        """The child once it has finished (or as it is at the deadline). The parent's kill,
        from here or another OS process, stops the wait."""
        k = self.kernel
        while True:
            if journal.kill_requested(self.store, proc.pid):
                raise asyncio.CancelledError
            left = deadline - time.monotonic()
            task, done = k.task_of(pid)
            if task is not None and not done:
                await asyncio.wait([task], timeout=max(0.0, min(POLL, left)))
            else:
                child = k.get(pid)
                if child.status.finished or left <= 0:
                    return child
                await asyncio.sleep(max(0.0, min(POLL, left)))
            if time.monotonic() >= deadline:
                return k.get(pid)


def _args(proc: Process, call: ToolCall) -> dict[str, Any]:
    tool = proc.program.tool_table[call.name]
    policy = proc.program.policy
    if policy.allowed_tools is not None and call.name not in policy.allowed_tools:
        raise Refused(f"tool {call.name!r} is not allowed for this program")
    if policy.read_only and not tool.read_only:
        raise Refused(f"tool {call.name!r} starts processes, and this program is read-only")
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise Refused(f"arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(args, dict):
        raise Refused("arguments must be a JSON object")
    return check_args(tool, args)


def _depth(store: Any, pid: int) -> int:
    depth = 0
    while (row := store.one("SELECT parent_pid FROM processes WHERE pid = ?", (pid,))) and row[0]:
        depth, pid = depth + 1, row[0]
    return depth


def _summary(child: Process) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": child.pid, "status": child.status.value}
    if child.answer is not None:
        out["answer"] = child.answer
    elif child.status.finished:
        out["reason"] = child.reason
    return out
