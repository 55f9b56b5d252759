"""Start read-only tool calls as early as their inputs allow, with the transcript unchanged.

- Streamed tool calls: while the model writes a turn with several calls, each read-only call
  starts as soon as its arguments are complete in the stream (`ChatRequest.on_tool_call`).
- Speculation (a program's `speculate_tools: true`): while the model decides, the read-only
  calls it made at this turn the last time the program ran on the same input start at once.

Nothing here writes a step. When the turn is journaled, `act` takes a started call's result only
for a call it matches (same place in the turn, same tool, same arguments) and only where every
call before it in the turn is read-only too (no write could have changed what it read); it
journals the call and its result exactly as it would have. Everything else is a wrong guess,
dropped: no step, no tokens. Calls needing approval and kernel system calls never start early.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from llmos.backends.base import ChatRequest, ToolCall
from llmos.kernel import fork_tools
from llmos.kernel.process import ModelTurn, Process
from llmos.kernel.store import Store
from llmos.kernel.tools import ToolResult, execute

Key = tuple[int, str, str]  # (place in the turn, tool, canonical arguments)


def key_of(index: int, call: ToolCall) -> Key:
    try:
        args = json.dumps(json.loads(call.arguments or "{}"), sort_keys=True)
    except json.JSONDecodeError:
        args = call.arguments
    return index, call.name, args


class EarlyCalls:
    """The read-only calls started for one model turn of one process."""

    def __init__(self, proc: Process, run: Any) -> None:
        self.proc = proc
        self.run = run  # (thunk) -> awaitable ToolResult: calltools.in_thread
        self.started: dict[Key, asyncio.Future[ToolResult]] = {}
        self.table = proc.program.tool_table
        self.turn = proc.num_turns  # the turn these calls are for
        self.used = 0  # results taken (for the tests and the benchmark)

    def eligible(self, call: ToolCall) -> bool:
        tool = self.table.get(call.name)
        policy = self.proc.program.policy
        return (
            tool is not None
            and tool.read_only
            and call.name not in fork_tools.NAMES
            and call.name not in policy.needs_approval
        )

    def start(self, index: int, call: ToolCall) -> None:
        """Start `call` (the `index`th of the turn) if it may start early; once per key."""
        key = key_of(index, call)
        if key in self.started or not self.eligible(call):
            return
        p = self.proc
        thunk = functools.partial(
            execute, call.name, call.arguments, p.workspace, p.program.policy, table=self.table
        )
        self.started[key] = asyncio.ensure_future(self.run(thunk))

    def take(self, call: ToolCall) -> asyncio.Future[ToolResult] | None:
        """The started run of `call` from the turn just journaled, where it may stand in for
        running it now; else None."""
        turn = _last_turn(self.proc)
        if turn is None or self.proc.num_turns != self.turn + 1:
            return None
        index = next((i for i, c in enumerate(turn.tool_calls) if c.id == call.id), None)
        if index is None or not all(self.eligible(c) for c in turn.tool_calls[:index]):
            return None
        future = self.started.pop(key_of(index, call), None)
        if future is not None:
            self.used += 1
        return future

    def drop(self) -> None:
        """Wrong guesses: their results go nowhere (a thread already running finishes alone)."""
        for future in self.started.values():
            future.cancel()
        self.started.clear()


def begin(proc: Process, store: Store, request: ChatRequest, run: Any) -> EarlyCalls | None:
    """Before a model call: stream its read-only calls into an EarlyCalls (and pre-run the
    predicted ones, where the program speculates). None when the program does neither."""
    prog = proc.program
    if not (prog.stream_tools or prog.speculate_tools) or not request.tools:
        return None
    early = EarlyCalls(proc, run)
    if prog.stream_tools:
        request.on_tool_call = early.start
    if prog.speculate_tools:
        for i, call in enumerate(predict(proc, store)):
            early.start(i, call)
    return early


def predict(proc: Process, store: Store) -> list[ToolCall]:
    """The calls of the same turn of the last finished run of this program on this input."""
    row = store.one(
        "SELECT pid FROM processes WHERE program_name = ? AND input = ? AND pid != ?"
        " AND status = 'done' ORDER BY pid DESC LIMIT 1",
        (proc.program.name, proc.input, proc.pid),
    )
    if row is None:
        return []
    turns = [
        json.loads(r["data"])
        for r in store.query(
            "SELECT data FROM steps WHERE pid = ? AND kind = 'model_turn' ORDER BY seq", (row[0],)
        )
    ]
    n = proc.num_turns
    if n >= len(turns):
        return []
    return [ToolCall(**c) for c in turns[n]["tool_calls"]]


def _last_turn(proc: Process) -> ModelTurn | None:
    return next((s for s in reversed(proc.steps) if isinstance(s, ModelTurn)), None)
