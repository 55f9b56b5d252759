"""`llmos run PROGRAM|"task"` and `llmos resume PID`: run a process in this terminal,
showing its steps as they land. The default program is a read-only assistant over the
current folder."""

from __future__ import annotations

from pathlib import Path

import typer

from llmos.cli.kernel_view import DB, fail, follow, open_kernel

PROGRAM_SUFFIXES = (".yaml", ".yml", ".json", ".py")
DEFAULT_PROMPT = (
    "You are a careful assistant working in a folder of files. Use the tools to "
    "look at the files before you answer; answer briefly and say which files you "
    "read."
)


def default_program():  # noqa: ANN201 - a Program
    from llmos.kernel import Program

    return Program(
        name="assistant",
        version="1",
        system_prompt=DEFAULT_PROMPT,
        tools=["read_file", "search_files", "list_dir"],
        # read a file first, then one more call (another file, a search for a word of the
        # task, a listing), then answer from the evidence: each schedule and answer turn
        # measured on benchmarks/agent_tasks.py (BENCHMARKS.md "Agent tasks")
        tool_choice=["read_file", "required", "none"],
        answer_turn="evidence",
        policy={"read_only": True},
        limits={"max_steps": 8},
        sampling={"temperature": 0.0, "max_tokens": 256},
    )


def run(
    program: str = typer.Argument(
        ...,
        help="A program file (.yaml, .yml, .json, .py) or a "
        "task for the default read-only assistant.",
    ),
    input: str | None = typer.Option(
        None, "--input", "-i", help="The process's input (the task, for a program file)."
    ),
    workspace: Path = typer.Option(
        Path("."), "--workspace", "-w", help="The folder its tools work in."
    ),
    user: str | None = typer.Option(None, "--user", "-u", help="Who the usage is charged to."),
    priority: int = typer.Option(
        0, "--priority", help="Higher runs first (and may preempt lower)."
    ),
    model: str = typer.Option(
        "local",
        "--model",
        "-m",
        help="Backend for programs that name "
        "none: local[:MODEL], openai_http:MODEL@URL, scripted:FILE.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the answer."),
    db: str | None = DB,
) -> None:
    """Run a program (or a task) as a process and print its answer."""
    from llmos.kernel import ProgramError

    is_file = program.endswith(PROGRAM_SUFFIXES) and Path(program).is_file()
    if program.endswith(PROGRAM_SUFFIXES) and not is_file:
        raise fail(f"program file {program!r} does not exist")
    try:
        from llmos.kernel import Program

        spec = Program.load(program) if is_file else default_program()
        task = (input or "") if is_file else (program if input is None else f"{program}\n\n{input}")
        kernel = open_kernel(db, model)
    except ProgramError as exc:
        raise fail(str(exc)) from None
    with kernel:
        try:
            pid = kernel.spawn(spec, task, user=user, priority=priority, workspace=workspace)
        except (ProgramError, ValueError) as exc:
            raise fail(str(exc)) from None
        typer.secho(f"pid {pid}", err=True, dim=True)
        raise typer.Exit(_follow_or_kill(kernel, pid, quiet))


def resume(
    pid: int = typer.Argument(..., help="The process to continue."),
    model: str = typer.Option(
        "local", "--model", "-m", help="Backend for programs that name none."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the answer."),
    db: str | None = DB,
) -> None:
    """Continue a process that stopped mid-run (a crash, a closed terminal)."""
    from llmos.kernel import KernelError

    with open_kernel(db, model) as kernel:
        try:
            kernel.resume(pid)
        except KernelError as exc:
            raise fail(str(exc)) from None
        raise typer.Exit(_follow_or_kill(kernel, pid, quiet))


def _follow_or_kill(kernel, pid: int, quiet: bool) -> int:  # noqa: ANN001 - a Kernel
    try:
        return follow(kernel, pid, quiet)
    except KeyboardInterrupt:
        kernel.kill(pid)
        typer.secho(f"killed pid {pid}", err=True, fg="yellow")
        return 130


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(resume)
