"""`llmos ps`, `llmos kill PID` and `llmos logs PID`: look at processes and stop them."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.kernel_view import DB, fail, open_kernel, out, show_end, show_header, step_lines

PS_SQL = """SELECT p.pid, p.status, p.program_name, p.program_version, p.owner, p.priority,
    p.input, p.runner_pid, p.created_at, p.parent_pid,
    (SELECT COUNT(*) FROM usage u WHERE u.pid = p.pid) AS turns,
    (SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage u
     WHERE u.pid = p.pid) AS tokens,
    (SELECT COALESCE(SUM(cost), 0) FROM usage u WHERE u.pid = p.pid) AS cost
    FROM processes p ORDER BY p.pid"""
FINISHED = ("done", "failed", "killed")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def tree_order(rows: list[Any]) -> list[tuple[Any, int]]:
    """Rows in process-tree order (each child under its parent, oldest first) with depths."""
    pids = {r["pid"] for r in rows}
    kids: dict[int | None, list[Any]] = {}
    for r in rows:
        parent = r["parent_pid"] if r["parent_pid"] in pids else None
        kids.setdefault(parent, []).append(r)
    out: list[tuple[Any, int]] = []
    stack = [(r, 0) for r in reversed(kids.get(None, []))]
    while stack:
        r, depth = stack.pop()
        out.append((r, depth))
        stack += [(c, depth + 1) for c in reversed(kids.get(r["pid"], []))]
    return out


def ps(
    all_: bool = typer.Option(False, "--all", "-a", help="Include finished processes."),
    db: str | None = DB,
) -> None:
    """List processes (running ones, or every one with --all), sub-agents under their parent."""
    from llmos.kernel.journal import runner_alive

    with open_kernel(db) as kernel:
        rows = kernel.store.query(PS_SQL)
    table = Table(
        "PID",
        "STATUS",
        "PROGRAM",
        "OWNER",
        "PRI",
        "TURNS",
        "TOKENS",
        "COST",
        "AGE",
        "INPUT",
        box=None,
        header_style="bold",
    )
    now = time.time()
    for r, depth in tree_order(rows):
        status = r["status"]
        if status in FINISHED and not all_:
            continue
        if status not in FINISHED and not runner_alive(r):
            status += " (stopped: llmos resume)"
        table.add_row(
            ("  " * (depth - 1) + "└─ " if depth else "") + str(r["pid"]),
            status,
            escape(f"{r['program_name']}@{r['program_version']}"),
            escape(r["owner"] or "-"),
            str(r["priority"]),
            str(r["turns"]),
            str(r["tokens"]),
            f"${r['cost']:.6f}",
            _age(now - r["created_at"]),
            escape(" ".join(r["input"].split())[:40]),
        )
    out.print(table)


def kill(
    pid: int = typer.Argument(..., help="The process to stop."),
    wait: float = typer.Option(10.0, "--wait", help="Seconds to wait for it to stop."),
    db: str | None = DB,
) -> None:
    """Stop a process (at its next step, when another terminal runs it)."""
    from llmos.kernel import KernelError

    with open_kernel(db) as kernel:
        try:
            kernel.kill(pid)
        except KernelError as exc:
            raise fail(str(exc)) from None
        deadline = time.monotonic() + wait
        while (
            status := kernel.get(pid).status.value
        ) not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.1)
    out.print(
        f"pid {pid}: {status}"
        + ("" if status in FINISHED else " (the kill takes effect at its next step)")
    )


def logs(
    pid: int = typer.Argument(..., help="The process to show."),
    full: bool = typer.Option(False, "--full", help="Show whole tool outputs."),
    db: str | None = DB,
) -> None:
    """Print a process's transcript and, when it gave up, its report."""
    from llmos.kernel import KernelError

    with open_kernel(db) as kernel:
        try:
            p = kernel.get(pid)
        except KernelError as exc:
            raise fail(str(exc)) from None
    show_header(p)
    for i, step in enumerate(p.steps):
        for line in step_lines(step, i, full=full):
            out.print(line)
    if p.status.finished:
        show_end(p)


def register(app: typer.Typer) -> None:
    app.command()(ps)
    app.command()(kill)
    app.command()(logs)
