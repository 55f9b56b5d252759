"""`llmos usage [--user U]`: tokens and cost per user and model; set a user's budget."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.kernel_view import DB, fail, open_kernel, out


def usage(
    user: str | None = typer.Option(None, "--user", "-u", help="Only this user."),
    by_process: bool = typer.Option(False, "--by-process", help="One row per process."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Set --user's token budget."),
    max_cost: float | None = typer.Option(
        None, "--max-cost", help="Set --user's cost budget (dollars)."
    ),
    db: str | None = DB,
) -> None:
    """Show metered usage; with --max-tokens/--max-cost, set --user's budget."""
    with open_kernel(db) as kernel:
        if max_tokens is not None or max_cost is not None:
            if user is None:
                raise fail("--user: a budget belongs to a user")
            kernel.set_budget(user, max_tokens, max_cost)
            out.print(f"budget for {user}: tokens={max_tokens} cost={max_cost}")
        rows = kernel.meter.summary(user, by="pid" if by_process else "user, model")
        budgets = {r["user"]: r for r in kernel.store.query("SELECT * FROM budgets")}
    first = ["PID"] if by_process else ["USER", "MODEL"]
    table = Table(
        *first,
        "CALLS",
        "PROMPT",
        "CACHED",
        "COMPLETION",
        "ENGINE S",
        "COST",
        box=None,
        header_style="bold",
    )
    for r in rows:
        keys = [str(r["pid"])] if by_process else [escape(r["user"] or "-"), escape(r["model"])]
        table.add_row(
            *keys,
            str(r["calls"]),
            str(r["prompt_tokens"]),
            str(r["cached_tokens"]),
            str(r["completion_tokens"]),
            f"{r['engine_seconds']:.2f}",
            f"${r['cost']:.6f}",
        )
    out.print(table)
    for name, b in budgets.items():
        if user is None or name == user:
            out.print(f"budget {escape(name)}: tokens={b['max_tokens']} cost={b['max_cost']}")


def register(app: typer.Typer) -> None:
    app.command()(usage)
