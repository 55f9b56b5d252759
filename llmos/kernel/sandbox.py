"""The sandbox: every path a tool touches resolves inside the process's workspace.

Refused: absolute paths and `~`, any `..` component, symlinks (anywhere on the path) that
lead outside, and anything that is not a regular file or a folder (devices, FIFOs, sockets).
Writes open with O_NOFOLLOW, so a symlink planted after the check cannot redirect them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath


class Refused(Exception):
    """A tool call the sandbox or the policy will not carry out; the message says why."""


def workspace_root(workspace: str | Path) -> Path:
    root = Path(workspace).resolve()
    if not root.is_dir():
        raise Refused(f"workspace {str(workspace)!r} is not a folder")
    return root


def check_relative(path: str, field: str = "path") -> PurePosixPath:
    """The purely lexical checks: a non-empty relative path with no `..` and no NUL."""
    if not isinstance(path, str) or not path.strip():
        raise Refused(f"{field} must be a non-empty relative path")
    if "\x00" in path:
        raise Refused(f"{field} contains a NUL byte")
    if (
        path.startswith(("/", "~", "\\"))
        or os.path.isabs(path)
        or (len(path) > 1 and path[1] == ":")
    ):
        raise Refused(f"{field} {path!r} is absolute; use a path relative to the workspace")
    pure = PurePosixPath(path.replace("\\", "/"))
    if ".." in pure.parts:
        raise Refused(f"{field} {path!r} contains '..'; paths must stay inside the workspace")
    return pure


def resolve(
    workspace: str | Path, path: str, *, field: str = "path", must_exist: bool = True
) -> Path:
    """`path` inside the workspace, with every symlink on the way resolved and checked."""
    root = workspace_root(workspace)
    pure = check_relative(path, field)
    target = (root / pure).resolve()  # follows symlinks, including ones in parent folders
    if target != root and root not in target.parents:
        raise Refused(f"{field} {path!r} leads outside the workspace (through a symlink)")
    if not target.exists():
        if must_exist:
            raise Refused(f"{field} {path!r} does not exist")
        if os.path.lexists(root / pure):
            raise Refused(f"{field} {path!r} is a dangling symlink")
        return target
    st = target.stat()
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise Refused(f"{field} {path!r} is not a regular file or folder (device, FIFO or socket)")
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        raise Refused(f"{field} {path!r} is a hard link, which may lead outside the workspace")
    return target


def read_bytes(workspace: str | Path, target: Path) -> bytes:
    """Read a checked file without following a symlink swapped in since the check: the file
    actually opened must still be inside the workspace."""
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        opened = (
            Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists("/proc/self/fd") else target
        )
        root = workspace_root(workspace)
        if root not in opened.parents or not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused("the file changed into a link leading outside the workspace")
        return f.read()


def write_new(target: Path, data: bytes) -> None:
    """Create a file that must not exist yet; never follows a symlink."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def replace(target: Path, data: bytes) -> None:
    """Rewrite a regular file in place of itself (a temp file renamed over it)."""
    tmp = target.with_name(f".{target.name}.llmos-tmp")
    write_new(tmp, data)
    os.replace(tmp, target)


def make_parents(workspace: str | Path, path: str) -> None:
    """Create the missing folders of `path`, each checked against the workspace."""
    root = workspace_root(workspace)
    current = root
    for part in check_relative(path).parts[:-1]:
        current = current / part
        if os.path.islink(current) or (current.exists() and not current.is_dir()):
            raise Refused(f"path {path!r}: {part!r} is not a folder inside the workspace")
        if not current.exists():
            current.mkdir()
