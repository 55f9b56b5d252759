"""Shared by the kernel commands: the --db option, opening the kernel, and showing a
process's steps (as they land, for `run`/`resume`; all of them, for `logs`)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from llmos.kernel import Kernel, Process

DB = typer.Option(
    None,
    "--db",
    help="The kernel's SQLite file (default: $LLMOS_DB or ~/.local/share/llmos/llmos.db).",
)
# Wide when piped, so tables in logs and tests are not folded at 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def db_path(db: str | None) -> str:
    from llmos.kernel.store import default_db_path

    return db or str(default_db_path())


def open_kernel(db: str | None, backend: str | None = None) -> Kernel:
    from llmos.kernel import Kernel

    return Kernel(backend=backend, db=db_path(db))


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def _clip(text: str, n: int) -> str:
    text = text.rstrip()
    return text if len(text) <= n else text[:n] + f" … [{len(text) - n} more characters]"


def step_lines(step: Any, index: int, full: bool = False) -> list[str]:
    """One step as console markup lines."""
    n = 4000 if full else 300
    kind = step.kind
    if kind == "model_turn":
        head = (
            f"[bold]#{index} model[/bold] [dim]{step.prompt_tokens} prompt "
            f"({step.cached_tokens} cached) + {step.completion_tokens} completion tokens, "
            f"{step.engine_seconds:.2f}s, ${step.cost:.6f}"
            + (f" via {escape(step.backend)}" if getattr(step, "backend", None) else "")
            + "[/dim]"
        )
        lines = [head]
        if step.malformed:
            lines.append(f"  [yellow]unusable output:[/yellow] {escape(_clip(step.raw, n))}")
        elif step.content:
            lines.append("  " + escape(_clip(step.content, n)))
        lines += [
            f"  [cyan]→ {escape(c.name)}[/cyan]({escape(_clip(c.arguments, 200))}) "
            f"[dim]{c.id}[/dim]"
            for c in step.tool_calls
        ]
        return lines
    if kind == "tool_call":
        return [f"[dim]#{index} running {escape(step.name)} ({step.call_id})[/dim]"]
    if kind == "tool_result":
        mark = "[green]✓[/green]" if step.ok else "[red]✗[/red]"
        body = step.output if step.ok else step.error or ""
        return [
            f"#{index} {mark} {escape(step.name)} [dim]sha256 {step.sha256[:12]}[/dim]",
            *("    " + escape(ln) for ln in _clip(body, n).splitlines()[: 40 if full else 6]),
        ]
    if kind == "approval":
        word = "[green]approved[/green]" if step.allow else "[red]denied[/red]"
        return [f"#{index} {word} {step.call_id}"]
    if kind == "error":
        return [f"#{index} [yellow]{escape(step.what)}:[/yellow] {escape(step.message)}"]
    if kind == "final_answer":
        return [f"#{index} [bold green]answer[/bold green]"]
    if kind == "judge":  # a cascade's judge rated an answer (metered to the process)
        return [
            f"#{index} [cyan]judge[/cyan] {escape(step.backend or '?')}: "
            f"{escape(repr(step.verdict))} [dim]{step.prompt_tokens} prompt + "
            f"{step.completion_tokens} completion tokens, ${step.cost:.6f}[/dim]"
        ]
    if kind == "memory":  # what the memory manager did to fit a model call
        return [f"#{index} [magenta]memory[/magenta] {escape(memory_line(step))}"]
    if kind == "memory_summary":
        return [
            f"#{index} [magenta]memory summary[/magenta] [dim]{step.prompt_tokens} prompt + "
            f"{step.completion_tokens} completion tokens, ${step.cost:.6f}[/dim]",
            "  " + escape(_clip(step.content or step.raw, n)),
        ]
    raise AssertionError(f"unknown step kind {kind!r}")


def memory_line(c: Any) -> str:
    """A compaction in one line: the policy, what it did, and the tokens before and after."""
    est = " (estimated)" if c.estimate else ""
    if c.overflow:
        return f"{c.policy}: overflow, the call was not made: {c.overflow}"
    did = [f"dropped {c.cut} oldest messages"] if c.cut else []
    did += [f"elided {len(c.elided)} outputs"] if c.elided else []
    did += [f"summarized {c.summarized}"] if c.summarized else []
    did += [f"paged in {len(c.paged_in)} from recall"] if c.paged_in else []
    did += ["kept the last compaction (same prefix)"] if c.reused else []
    return (
        f"{c.policy}: {', '.join(did) or 'nothing'}; {c.tokens_before} → {c.tokens_after} "
        f"tokens{est} (room {c.limit})"
    )


def show_header(p: Process) -> None:
    u = p.usage
    out.print(
        f"[bold]pid {p.pid}[/bold] {escape(p.program.name)}@{p.program.version} "
        f"\\[{p.status.value}] owner={p.owner or '-'} workspace={escape(p.workspace)}"
    )
    out.print(f"goal: {escape(p.input)}")
    out.print(
        f"[dim]usage: {u.prompt_tokens} prompt ({u.cached_tokens} cached) + "
        f"{u.completion_tokens} completion tokens, {u.engine_seconds:.2f} engine s, "
        f"${u.cost:.6f}[/dim]"
    )


def show_end(p: Process) -> int:
    """Print the answer (stdout) or the give-up report (stderr); the exit code."""
    from llmos.kernel import Status, report

    if p.status is Status.DONE:
        out.print(p.answer or "", markup=False)
        return 0
    if p.report is not None:
        err.print(report.render(p.report), markup=False)
    return 1


def follow(kernel: Kernel, pid: int, quiet: bool = False) -> int:
    """Show a running process's steps as they land; returns the exit code."""
    shown = 0
    with err.status("starting…", spinner="dots") as status:
        while True:
            p = kernel.get(pid)
            steps = list(p.steps)
            for i in range(shown, len(steps)):
                if not quiet:
                    for line in step_lines(steps[i], i):
                        err.print(line)
            shown = len(steps)
            if p.status.finished:
                break
            waiting = ""
            if p.status.value == "waiting_approval":
                waiting = f" — run `llmos approve {pid}` (or --deny)"
            status.update(
                f"pid {pid} {p.status.value}{waiting} · {p.num_turns} turns · "
                f"{p.usage.total_tokens} tokens"
            )
            time.sleep(0.1)
    return show_end(kernel.wait(pid))


def print_json(value: Any) -> None:
    out.print(json.dumps(value, indent=2, default=str), markup=False)


def workspace_default() -> str:
    return os.getcwd()
