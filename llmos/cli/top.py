"""`llmos top`: a live view of the kernel's processes and, with `--url`, a server's engine,
refreshed once a second.

Keys: ↑/↓ (or j/k) select, s sorts by the next column, r reverses, u shows the next user only,
a hides or shows finished processes, x kills the selected process, l (or Enter) opens its log
(Esc or l goes back), q quits.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from llmos.cli.kernel_view import DB, db_path, step_lines
from llmos.cli.top_data import FINISHED, Engine, EngineWatch, Proc, read_processes

if TYPE_CHECKING:
    from llmos.kernel import Kernel

SORTS = ("pid", "state", "user", "steps", "tokens", "cost", "kv_blocks")
HELP = "↑↓ select  s sort  r reverse  u user  a finished  x kill  l log  q quit"
KEYS = {
    "\x1b[A": "up",
    "\x1b[B": "down",
    "\x1bOA": "up",
    "\x1bOB": "down",
    "\r": "enter",
    "\n": "enter",
}


@dataclass(slots=True)
class View:
    db: str
    url: str | None = None
    sort: str = "pid"
    reverse: bool = False
    user: str | None = None
    hide_finished: bool = False
    selected: int | None = None  # a pid
    log_pid: int | None = None
    message: str = ""
    procs: list[Proc] = field(default_factory=list)
    engine: Engine | None = None
    kernel: Any = None  # opened on the first kill or log

    def refresh(self, watch: EngineWatch | None) -> None:
        self.procs = read_processes(self.db)
        if watch is not None:
            self.engine = watch.read()
            for p in self.procs:
                p.kv_blocks = self.engine.pins.get(p.pid, 0)
        self._keep_selection()

    def _keep_selection(self) -> None:
        shown = self.rows()
        if shown and self.selected not in {p.pid for p in shown}:
            self.selected = shown[0].pid

    def rows(self) -> list[Proc]:
        rows = [
            p
            for p in self.procs
            if (self.user is None or p.user == self.user)
            and not (self.hide_finished and p.state in FINISHED)
        ]
        sort = self.sort

        def key(p: Proc) -> Any:
            return (p.kv_blocks or 0) if sort == "kv_blocks" else getattr(p, sort)

        return sorted(rows, key=key, reverse=self.reverse)

    def _kernel(self) -> Kernel:
        if self.kernel is None:
            from llmos.kernel import Kernel

            self.kernel = Kernel(db=self.db)
        return self.kernel

    def handle(self, key: str) -> bool:
        """Apply one key; False to quit."""
        if self.log_pid is not None:
            if key in ("q", "l", "\x1b", "enter"):
                self.log_pid = None
            return True
        rows = self.rows()
        pids = [p.pid for p in rows]
        at = pids.index(self.selected) if self.selected in pids else 0
        if key == "q":
            return False
        if key in ("up", "k") and pids:
            self.selected = pids[max(0, at - 1)]
        elif key in ("down", "j") and pids:
            self.selected = pids[min(len(pids) - 1, at + 1)]
        elif key == "s":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        elif key == "r":
            self.reverse = not self.reverse
        elif key == "u":
            users = sorted({p.user for p in self.procs})
            options: list[str | None] = [None, *users]
            i = options.index(self.user) if self.user in options else 0
            self.user = options[(i + 1) % len(options)]
        elif key == "a":
            self.hide_finished = not self.hide_finished
        elif key == "x" and self.selected is not None:
            self._kill(self.selected)
        elif key in ("l", "enter") and self.selected is not None:
            self.log_pid = self.selected
        self._keep_selection()
        return True

    def _kill(self, pid: int) -> None:
        from llmos.kernel import KernelError

        try:
            self._kernel().kill(pid)
            self.message = f"kill requested: pid {pid}"
        except KernelError as exc:
            self.message = f"kill pid {pid}: {exc}"

    def close(self) -> None:
        if self.kernel is not None:
            self.kernel.close()


# -- rendering -----------------------------------------------------------------------------
def _fmt(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{unit}"


def engine_panel(e: Engine | None, url: str | None) -> Panel:
    if e is None:
        return Panel("no server: pass --url http://HOST:PORT", title="engine", expand=True)
    if e.error:
        return Panel(Text(e.error, style="red"), title="engine", expand=True)
    grid = Table.grid(padding=(0, 3))
    for _ in range(4):
        grid.add_column()
    grid.add_row(
        f"running [bold]{_fmt(e.running, '.0f')}[/bold]",
        f"waiting [bold]{_fmt(e.waiting, '.0f')}[/bold]",
        f"KV use [bold]{_fmt(e.kv_usage, '.1f', 100, '%')}[/bold]",
        f"prefix-cache hits [bold]{_fmt(e.hit_rate, '.1f', 100, '%')}[/bold]"
        f" [dim](all {_fmt(e.hit_rate_all, '.1f', 100, '%')})[/dim]",
    )
    grid.add_row(
        f"tok/s [bold]{_fmt(e.tok_s, '.1f')}[/bold]",
        f"TTFT [bold]{_fmt(e.ttft, '.0f', 1000, ' ms')}[/bold]",
        f"ITL [bold]{_fmt(e.itl, '.1f', 1000, ' ms')}[/bold]",
        "",
    )
    return Panel(grid, title=f"engine {escape(url or '')}", expand=True)


def process_table(view: View) -> Table:
    arrow = "▼" if view.reverse else "▲"
    table = Table(expand=True, box=None, header_style="bold")
    for name in ("PID", "PROGRAM", "USER", "STATE", "STEPS", "TOKENS", "COST", "KV", "INPUT"):
        key = {"KV": "kv_blocks", "PROGRAM": "program"}.get(name, name.lower())
        table.add_column(f"{name}{arrow if key == view.sort else ''}", no_wrap=True)
    for p in view.rows():
        table.add_row(
            ("▸ " if p.pid == view.selected else "  ") + str(p.pid),
            escape(p.program),
            escape(p.user),
            p.state,
            str(p.steps),
            str(p.tokens),
            f"${p.cost:.6f}",
            "-" if p.kv_blocks is None else str(p.kv_blocks),
            escape(p.input[:40]),
            style="reverse" if p.pid == view.selected else None,
        )
    return table


def log_view(view: View, height: int) -> Panel:
    from llmos.kernel import KernelError

    pid = view.log_pid
    assert pid is not None
    try:
        p = view._kernel().get(pid)
    except KernelError as exc:
        return Panel(escape(str(exc)), title=f"log {pid}")
    lines = [f"goal: {escape(p.input)}", f"state: {p.status.value}"]
    for i, step in enumerate(p.steps):
        lines += step_lines(step, i)
    if p.answer:
        lines.append(escape(p.answer))
    shown = lines[-max(3, height - 4) :]
    title = f"log pid {pid} {escape(p.program.name)} — Esc/l back"
    return Panel(Text.from_markup("\n".join(shown)), title=title, expand=True)


def render(view: View, height: int = 40) -> Group:
    filters = f"sort {view.sort}{' reversed' if view.reverse else ''}"
    filters += f"  user {view.user or 'all'}" + ("  active only" if view.hide_finished else "")
    head = Text.assemble(
        ("llmos top", "bold"),
        f"  {time.strftime('%H:%M:%S')}  {view.db}  {filters}",
        (f"  {view.message}" if view.message else "", "yellow"),
    )
    if view.log_pid is not None:
        return Group(head, log_view(view, height))
    return Group(
        head, engine_panel(view.engine, view.url), process_table(view), Text(HELP, style="dim")
    )


# -- the terminal --------------------------------------------------------------------------
def split_keys(data: str) -> list[str]:
    """The keys in what one read returned (a fast typist, or a busy machine, sends several)."""
    keys, i = [], 0
    while i < len(data):
        seq = next((k for k in KEYS if data.startswith(k, i)), None)
        if seq is not None:
            keys.append(KEYS[seq])
            i += len(seq)
        elif data.startswith("\x1b[", i):  # another escape sequence: skip it whole
            j = i + 2
            while j < len(data) and not data[j].isalpha() and data[j] != "~":
                j += 1
            i = j + 1
        else:
            keys.append(data[i])
            i += 1
    return keys


@contextlib.contextmanager
def keyboard() -> Iterator[Any]:
    """Keys from stdin without Enter or echo (cbreak); a no-op reader off a terminal."""
    if not sys.stdin.isatty():
        yield lambda timeout: time.sleep(timeout)
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    pending: list[str] = []

    def read(timeout: float) -> str | None:
        if not pending:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            pending.extend(split_keys(os.read(fd, 64).decode(errors="replace")))
        return pending.pop(0) if pending else None

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def top(
    db: str | None = DB,
    url: str | None = typer.Option(
        None, "--url", help="A server (llmos or vLLM) whose /metrics feed the engine panel."
    ),
    user: str | None = typer.Option(None, "--user", help="Show this user's processes only."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one screen and exit."),
) -> None:
    """A live view of processes and the engine (keys: s sort, u user, x kill, l log, q quit)."""
    view = View(db_path(db), url, user=user)
    watch = EngineWatch(url) if url else None
    console = Console(highlight=False)
    if once:
        view.refresh(watch)
        console.print(render(view, console.height))
        return
    try:
        with keyboard() as read, Live(console=console, screen=True, auto_refresh=False) as live:
            due = 0.0
            while True:
                if time.monotonic() >= due:
                    view.refresh(watch)
                    due = time.monotonic() + max(0.1, interval)
                live.update(render(view, console.height), refresh=True)
                key = read(max(0.0, due - time.monotonic()))
                if key is not None and not view.handle(key):
                    break
    except KeyboardInterrupt:
        pass
    finally:
        view.close()


def register(app: typer.Typer) -> None:
    app.command()(top)
