"""The built-in system calls. Reads are sandboxed; the only writes are `apply_patch` (a
unified diff) and `write_file` (new files only); `run_command` runs an allow-listed argv."""

from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import threading

from llmos.kernel import fork_tools, patch, sandbox
from llmos.kernel.sandbox import Refused
from llmos.kernel.toolspec import (
    CommandLine,
    NewPath,
    TaskWord,
    Tool,
    ToolContext,
    WorkspaceDir,
    WorkspaceFile,
    tool,
    tool_of,
)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PROGRAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# No shell runs, but an allow-listed program may hand its arguments to one (make, git
# aliases), so shell syntax in an argument is refused rather than trusted to stay inert.
_SHELL_SYNTAX = re.compile(r"[;|&$`<>!\n\r]")
MAX_LISTING = 500
MAX_SEARCHED_FILES = 5000


def _read_text(ctx: ToolContext, path: str) -> str:
    target = sandbox.resolve(ctx.workspace, path)
    if not target.is_file():
        raise Refused(f"path {path!r} is a folder; use list_dir")
    if target.stat().st_size > ctx.policy.max_file_bytes:
        raise Refused(f"path {path!r} is larger than {ctx.policy.max_file_bytes} bytes")
    data = sandbox.read_bytes(ctx.workspace, target)
    if b"\x00" in data[:8192]:
        raise Refused(f"path {path!r} is a binary file")
    return data.decode("utf-8", errors="replace")


@tool(read_only=True)
def read_file(
    path: WorkspaceFile, ctx: ToolContext, start_line: int = 1, max_lines: int = 400
) -> str:
    """Read a text file in the workspace.

    Args:
        path: The file, relative to the workspace.
        start_line: The first line to show (1-based).
        max_lines: How many lines to show at most.
    """
    lines = _read_text(ctx, path).splitlines()
    start = max(1, start_line)
    shown = lines[start - 1 : start - 1 + max(1, max_lines)]
    more = len(lines) - (start - 1 + len(shown))
    return "\n".join(shown) + (f"\n[... {more} more lines]" if more > 0 else "")


@tool(read_only=True)
def list_dir(ctx: ToolContext, path: WorkspaceDir = ".") -> str:
    """List a folder in the workspace (folders end with '/').

    Args:
        path: The folder, relative to the workspace.
    """
    target = ctx.workspace if path in (".", "./", "") else sandbox.resolve(ctx.workspace, path)
    if not target.is_dir():
        raise Refused(f"path {path!r} is not a folder")
    entries = sorted(target.iterdir())
    names = [e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in entries]
    more = len(names) - MAX_LISTING
    return "\n".join(names[:MAX_LISTING]) + (f"\n[... {more} more]" if more > 0 else "")


@tool(read_only=True)
def search_files(
    query: TaskWord, ctx: ToolContext, path: WorkspaceDir = ".", max_results: int = 50
) -> str:
    """Find lines containing a text (case-insensitive) in the workspace's files.

    Args:
        query: The text to look for (plain text, not a pattern): a word from the task.
        path: The folder to search, relative to the workspace.
        max_results: How many matching lines to return at most.
    """
    root = ctx.workspace if path in (".", "./", "") else sandbox.resolve(ctx.workspace, path)
    needle = query.lower()
    if not needle:
        raise Refused("query must not be empty")
    hits: list[str] = []
    seen = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            seen += 1
            if seen > MAX_SEARCHED_FILES:
                return "\n".join(hits + [f"[... stopped after {MAX_SEARCHED_FILES} files]"])
            rel = os.path.relpath(os.path.join(folder, name), ctx.workspace)
            try:
                text = _read_text(ctx, rel)
            except (Refused, OSError):
                continue  # symlinks out, binaries, devices and huge files are skipped
            for n, line in enumerate(text.splitlines(), 1):
                if needle in line.lower():
                    hits.append(f"{rel}:{n}: {line.strip()[:200]}")
                    if len(hits) >= max_results:
                        return "\n".join(hits) + "\n[... more results cut]"
    return "\n".join(hits) or "no matches"


@tool
def write_file(path: NewPath, content: str, ctx: ToolContext) -> str:
    """Create a new file in the workspace. Existing files change only through apply_patch.

    Args:
        path: The new file, relative to the workspace.
        content: Its text.
    """
    target = sandbox.resolve(ctx.workspace, path, must_exist=False)
    if target.exists():
        raise Refused(f"path {path!r} exists; change it with apply_patch")
    if len(content.encode()) > ctx.policy.max_file_bytes:
        raise Refused(f"content is larger than {ctx.policy.max_file_bytes} bytes")
    sandbox.make_parents(ctx.workspace, path)
    sandbox.write_new(target, content.encode())
    return f"created {path} ({len(content)} characters)"


@tool
def apply_patch(patch_text: str, ctx: ToolContext) -> str:
    """Change files with a unified diff ('--- a/PATH', '+++ b/PATH', '@@' hunks).

    Args:
        patch_text: The unified diff; every hunk must match the current file text.
    """
    return patch.apply(ctx.workspace, patch_text)


def _check_argv(argv: list[str], ctx: ToolContext) -> None:
    if not argv or not all(isinstance(a, str) for a in argv):
        raise Refused("argv must be a non-empty list of strings")
    program = argv[0]
    if not _PROGRAM_NAME.match(program):
        raise Refused(f"command {program!r} must be a bare program name (no paths, no shell)")
    if program not in ctx.policy.commands:
        raise Refused(
            f"command {program!r} is not on this program's allow-list {sorted(ctx.policy.commands)}"
        )
    for arg in argv[1:]:
        if "\x00" in arg:
            raise Refused("an argument contains a NUL byte")
        if _SHELL_SYNTAX.search(arg):
            raise Refused(f"argument {arg!r} contains shell syntax (; | & $ ` < > ! or a newline)")
        for piece in re.split(r"[=:,]", arg):
            if piece.startswith(("/", "~")) or ".." in piece.replace("\\", "/").split("/"):
                raise Refused(f"argument {arg!r} names a path outside the workspace")
            if piece and not piece.startswith("-") and os.path.lexists(ctx.workspace / piece):
                sandbox.resolve(ctx.workspace, piece, field="argument")  # symlinks out


@tool
def run_command(argv: CommandLine, ctx: ToolContext) -> str:
    """Run an allow-listed program (no shell) in the workspace and return its output.

    Args:
        argv: The program and its arguments, e.g. ["pytest", "-q"].
    """
    _check_argv(argv, ctx)
    policy = ctx.policy
    if shutil.which(argv[0], path=SAFE_PATH) is None:
        raise Refused(f"command {argv[0]!r} is not installed")
    env = {"PATH": SAFE_PATH, "HOME": str(ctx.workspace), "LANG": "C.UTF-8", "TERM": "dumb"}
    cap = policy.max_output_chars
    runaway = max(4 * cap, 1 << 20)  # bytes read before a writer counts as runaway
    isolate = [] if policy.network else network_isolation()
    try:
        proc = subprocess.Popen(
            (isolate or []) + argv,
            cwd=ctx.workspace,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole at the end
            preexec_fn=_limits(policy.command_timeout, policy.max_written_bytes),
        )
    except FileNotFoundError:
        raise Refused(f"command {argv[0]!r} is not installed") from None
    chunks: list[bytes] = []
    size = [0]

    def drain() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            if size[0] < cap:
                chunks.append(chunk)
            size[0] += len(chunk)
            if size[0] > runaway:  # a runaway writer: stop it rather than read forever
                _kill(proc)
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=policy.command_timeout)
    except subprocess.TimeoutExpired:
        code = None
    _kill(proc)  # always: what it left running in its group (a daemon, a stray child) goes too
    reader.join(5)
    out = b"".join(chunks)[:cap].decode("utf-8", errors="replace")
    if size[0] > cap:
        out += f"\n[... output cut at {cap} of {size[0]}+ bytes]"
    if size[0] > runaway:
        raise Refused(
            f"{argv[0]} wrote more than {runaway} bytes and was stopped; output starts:\n{out}"
        )
    if code is None:
        raise Refused(
            f"{argv[0]} ran past its {policy.command_timeout:g}s timeout and was "
            f"killed; output so far:\n{out}"
        )
    why = {
        -signal.SIGXFSZ: f" (stopped: it wrote a file past the {policy.max_written_bytes}-byte "
        "limit, policy.max_written_bytes)",
        -signal.SIGXCPU: " (stopped: it used up its CPU time limit)",
    }.get(code, "")
    note = "" if policy.network or isolate else "\n[note: the network is not isolated here]"
    return f"exit code {code}{why}{note}\n{out}"


@functools.cache
def network_isolation() -> list[str] | None:
    """The argv prefix that runs a command in a new, empty network namespace (only a loopback
    that is down: no connection anywhere), or None where this machine does not allow one."""
    unshare = shutil.which("unshare", path=SAFE_PATH)
    if unshare is None:
        return None
    prefix = [unshare, "--net"] if os.geteuid() == 0 else [unshare, "--map-root-user", "--net"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return [*prefix, "--"] if probe.returncode == 0 else None


def _limits(timeout: float, max_written: int):  # noqa: ANN202 - a preexec function
    """CPU seconds and the size of any file the command writes, capped in the child."""

    def apply() -> None:
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_written, max_written))

    return apply


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


BUILTINS: dict[str, Tool] = {
    t.name: t
    for t in map(
        tool_of,
        (
            read_file,
            list_dir,
            search_files,
            write_file,
            apply_patch,
            run_command,
            fork_tools.spawn_agent,
            fork_tools.wait_agents,
            fork_tools.map_agents,
        ),
    )
    if t is not None
}
