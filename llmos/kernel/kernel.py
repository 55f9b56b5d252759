"""The kernel: runs many processes on one asyncio loop (its own thread), over shared
backends, with every step in the store. `Kernel(backend=..., db=PATH)`."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

from llmos.backends import Backend
from llmos.backends.base import ToolCall
from llmos.kernel import journal, loop
from llmos.kernel.children import Children
from llmos.kernel.meter import Meter, Price
from llmos.kernel.process import Process, Status
from llmos.kernel.program import Program, ProgramError
from llmos.kernel.router import resolve  # backend names, plus cascade:[...]
from llmos.kernel.store import Store, default_db_path

log = logging.getLogger(__name__)
APPROVAL_POLL = 0.5  # seconds between looks at the store for a decision made elsewhere


class KernelError(RuntimeError):
    """A kernel call that cannot be done as asked (unknown pid, a process run elsewhere)."""


class Kernel:
    def __init__(
        self,
        backend: Backend | str | None = None,
        db: str | Path | None = None,
        *,
        prices: dict[str, Price] | None = None,
    ) -> None:
        self.store = Store(db if db is not None else default_db_path())
        self.meter = Meter(self.store, prices)
        # a name is resolved on first use, so a kernel that only reads the store loads nothing
        self._default_name = backend if isinstance(backend, str) else None
        self.backend = None if isinstance(backend, str) else backend
        self._backends: dict[str, Backend] = {}
        self._procs: dict[int, Process] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._done: dict[int, threading.Event] = {}
        self._contexts: dict[int, loop.Context] = {}
        self._events: dict[int, asyncio.Event] = {}
        self.children = Children(self)  # the fork/join system calls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="llmos-kernel", daemon=True
        )
        self._thread.start()

    # -- processes ------------------------------------------------------------------------
    def spawn(
        self,
        program: Program | str | Path,
        input: str = "",
        user: str | None = None,
        priority: int = 0,
        *,
        workspace: str | Path | None = None,
    ) -> int:
        """Start a process; returns its pid at once. Its model calls carry `priority` to the
        engine: higher runs first, and may preempt lower."""
        if not isinstance(program, Program):
            program = Program.load(program)
        self.check_program(program)
        backend = self.backend_for(program)
        ws = str(Path(workspace or os.getcwd()).resolve())
        if not Path(ws).is_dir():
            raise ProgramError(f"workspace {ws!r} is not a folder")
        pid = journal.create(self.store, program, input, ws, user, priority, backend.name)
        self._start(journal.load(self.store, pid, program), backend)
        return pid

    def resume(self, pid: int, program: Program | None = None) -> int:
        """Continue a process that stopped mid-run (a crash, a closed terminal). Safe on the
        kernel's own loop too (a parent resuming its children)."""
        if pid in self._done and not self._done[pid].is_set():
            return pid
        row = self._row(pid)
        proc = journal.load(self.store, pid, program)
        if proc.status.finished:
            return pid
        if journal.runner_alive(row) and row["runner_pid"] != os.getpid():
            raise KernelError(f"process {pid} is running in OS process {row['runner_pid']}")
        source = proc.program.source
        if program is None and source and os.path.isfile(source):  # now its code may load
            proc.program = Program.load(source)
        journal.claim(self.store, pid)
        self._start(proc, self.backend_for(proc.program))
        return pid

    def wait(self, pid: int, timeout: float | None = None) -> Process:
        done = self._done.get(pid)
        if done is not None:
            if not done.wait(timeout):
                raise TimeoutError(f"process {pid} is still {self._procs[pid].status.value}")
            return self._procs[pid]
        return self.get(pid)

    def get(self, pid: int) -> Process:
        """The live process when it runs here, else its state in the store."""
        if pid in self._procs:
            return self._procs[pid]
        self._row(pid)
        return journal.load(self.store, pid)

    def kill(self, pid: int) -> None:
        """Stop a process and its sub-agents: at once when it runs here, at its next step when
        it runs in another OS process (`llmos kill`), or right away in the store when nothing
        runs it."""
        self._row(pid)
        for p in [pid, *journal.descendants(self.store, pid)]:  # seen by any runner
            journal.request_kill(self.store, p)
        task = self._tasks.get(pid)
        if task is not None and not self._done[pid].is_set():
            self._loop.call_soon_threadsafe(task.cancel)
            self.wait(pid, 30)  # its end kills its children (_run)
            return
        row = self._row(pid)
        if journal.runner_alive(row) and row["runner_pid"] != os.getpid():
            return  # its runner sees the request at its next step
        self._record_kill(pid, "killed by a person (kill)")
        self._kill_children(pid)

    def task_of(self, pid: int) -> tuple[asyncio.Task[None] | None, bool]:
        """The task that runs `pid` here (None where none ever did) and whether it is done."""
        done = self._done.get(pid)
        return self._tasks.get(pid), done is None or done.is_set()

    def tree(self, pid: int) -> list[Process]:
        """`pid`'s sub-agents and theirs, children before their own children."""
        return [self.get(p) for p in journal.descendants(self.store, pid)]

    def approve(self, pid: int, call_id: str, allow: bool = True) -> None:
        self._row(pid)
        journal.decide(self.store, pid, call_id, allow)
        event = self._events.get(pid)
        if event is not None:
            self._loop.call_soon_threadsafe(event.set)

    def ps(self) -> list[Process]:
        return [
            self.get(r["pid"]) for r in self.store.query("SELECT pid FROM processes ORDER BY pid")
        ]

    # -- metering -------------------------------------------------------------------------
    def set_budget(
        self, user: str, max_tokens: int | None = None, max_cost: float | None = None
    ) -> None:
        self.meter.set_budget(user, max_tokens, max_cost)

    def usage(self, user: str | None = None) -> list[dict[str, Any]]:
        return self.meter.summary(user)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the kernel. Processes still running stop where they are and stay resumable
        (`resume(pid)`), as after a crash, but with their last step saved cleanly."""
        for pid, task in list(self._tasks.items()):
            if not self._done[pid].is_set():
                self._contexts[pid].detached = True
                self._loop.call_soon_threadsafe(task.cancel)
                self._done[pid].wait(10)
        for backend in {id(b): b for b in [self.backend, *self._backends.values()] if b}.values():
            asyncio.run_coroutine_threadsafe(backend.aclose(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.store.close()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------
    def _row(self, pid: int) -> Any:
        row = self.store.one("SELECT * FROM processes WHERE pid = ?", (pid,))
        if row is None:
            raise KernelError(f"no process with pid {pid}")
        return row

    def check_program(self, program: Program) -> None:
        known = program.tool_table
        missing = [t for t in program.tools if t not in known]
        if missing:
            raise ProgramError(
                f"tools: {missing} are neither built-in nor the program's own tools; "
                f"known: {sorted(known)}"
            )

    def backend_for(self, program: Program) -> Backend:
        name = os.environ.get("LLMOS_BACKEND") or program.model
        if (
            self.backend is None
            and self._default_name is not None
            and name in (None, self._default_name)
        ):
            self.backend = resolve(self._default_name)
        if name is None:
            if self.backend is None:
                raise ProgramError(
                    "model: the program names no backend and the kernel has "
                    "no default; pass Kernel(backend=...)"
                )
            return self.backend
        if self.backend is not None and name in (self.backend.name, self._default_name):
            return self.backend
        if name not in self._backends:
            self._backends[name] = resolve(name)
        return self._backends[name]

    def _context(self, proc: Process, backend: Backend | None) -> loop.Context:
        return loop.Context(
            backend,
            self.store,
            self.meter,  # type: ignore[arg-type]
            self._decide,
            lambda p: journal.kill_requested(self.store, p.pid),
            syscalls=self.children.syscalls(),
            budget=self.children.tree_budget,
        )

    def _record_kill(self, pid: int, why: str) -> None:
        """Nothing runs `pid`: record its kill in the store now."""
        proc = journal.load(self.store, pid)
        if not proc.status.finished:
            loop.give_up(proc, self._context(proc, self.backend), loop.GiveUp("killed", why))
            journal.save_status(self.store, proc)

    def _kill_children(self, pid: int) -> None:
        """A child does not outlive its parent: stop each unfinished one (never blocks, so the
        kernel's loop may call it)."""
        for child in journal.children(self.store, pid):
            journal.request_kill(self.store, child)
            task, done = self.task_of(child)
            if task is not None and not done:
                self._loop.call_soon_threadsafe(task.cancel)  # its own end kills its children
                continue
            row = self._row(child)
            if journal.runner_alive(row) and row["runner_pid"] != os.getpid():
                continue  # its runner sees the request at its next step
            self._record_kill(child, f"killed: its parent process {pid} stopped")
            self._kill_children(child)

    def _start(self, proc: Process, backend: Backend) -> None:
        self._procs[proc.pid] = proc
        ctx = self._contexts[proc.pid] = self._context(proc, backend)
        done = self._done[proc.pid] = threading.Event()
        started = threading.Event()

        def start() -> None:
            self._events[proc.pid] = asyncio.Event()
            self._tasks[proc.pid] = self._loop.create_task(self._run(proc, ctx, done))
            started.set()

        if threading.current_thread() is self._thread:  # a parent spawning on the loop
            start()
            return
        self._loop.call_soon_threadsafe(start)
        started.wait()

    async def _run(self, proc: Process, ctx: loop.Context, done: threading.Event) -> None:
        try:
            await loop.run(proc, ctx)
            if ctx.detached:
                journal.release(self.store, proc.pid)
        except Exception as exc:
            # Our own bug. It must not leave the process "running" for ever with nothing
            # running it: log the traceback, fail the process with a report, serve the rest.
            log.exception("process %d: kernel error", proc.pid)
            why = f"kernel error: {type(exc).__name__}: {exc}"
            loop.give_up(proc, ctx, loop.GiveUp("internal", why))
            journal.save_status(self.store, proc)
        finally:
            if ctx.backend is not None:  # its next turn is not coming here
                ctx.backend.release(loop.retain_key(proc))
            if not ctx.detached:
                self._kill_children(proc.pid)
            self._events.pop(proc.pid, None)
            done.set()

    async def _decide(self, proc: Process, call: ToolCall) -> bool | None:
        """A person's decision on a call, from this kernel or another OS process."""
        decided = journal.decision(self.store, proc.pid, call.id)
        if decided is not None:
            return decided
        if journal.kill_requested(self.store, proc.pid):
            raise asyncio.CancelledError
        event = self._events[proc.pid]
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), APPROVAL_POLL)
        except TimeoutError:
            pass
        return None


__all__ = ["Kernel", "KernelError", "Process", "Program", "Status"]
