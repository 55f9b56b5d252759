"""`llmos approve PID [--call ID] [--deny]`: decide on calls a process waits to make. When no
terminal runs the process any more, it goes on here."""

from __future__ import annotations

import typer

from llmos.cli.kernel_view import DB, fail, follow, open_kernel, out


def approve(
    pid: int = typer.Argument(..., help="The process waiting for approval."),
    call: list[str] | None = typer.Option(
        None, "--call", "-c", help="The call id (default: every call it waits on)."
    ),
    deny: bool = typer.Option(False, "--deny", help="Refuse instead of allowing."),
    model: str = typer.Option("local", "--model", "-m", help="Backend, when it resumes here."),
    db: str | None = DB,
) -> None:
    """Allow (or --deny) the calls a process waits on."""
    from llmos.kernel import KernelError
    from llmos.kernel.journal import decision, runner_alive

    with open_kernel(db, model) as kernel:
        try:
            p = kernel.get(pid)
        except KernelError as exc:
            raise fail(str(exc)) from None
        needs = set(p.program.policy.needs_approval)
        waiting = [
            c.id
            for c in p.pending_calls()
            if c.name in needs and decision(kernel.store, pid, c.id) is None
        ]
        chosen = list(call or waiting)
        if not chosen:
            raise fail(f"process {pid} ({p.status.value}) waits on no call", 1)
        unknown = sorted(set(chosen) - {c.id for c in p.pending_calls()})
        if unknown:
            raise fail(
                f"--call: process {pid} has no pending call {unknown}; pending: "
                f"{[c.id for c in p.pending_calls()]}"
            )
        for call_id in chosen:
            kernel.approve(pid, call_id, not deny)
            out.print(f"pid {pid}: {'denied' if deny else 'approved'} {call_id}")
        row = kernel.store.one("SELECT * FROM processes WHERE pid = ?", (pid,))
        if p.status.finished or runner_alive(row):
            return
        kernel.resume(pid)  # nothing runs it any more: go on here
        raise typer.Exit(follow(kernel, pid))


def register(app: typer.Typer) -> None:
    app.command()(approve)
