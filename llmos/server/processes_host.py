"""The kernel that `llmos serve` hosts beside its engine: the same engine, through the local
backend, so HTTP chat requests and processes are batched and scheduled together.

What a caller may ask of it is checked here: programs by registered name or inline spec (an
inline spec from a non-admin may not name another backend, load code, or run commands), and
workspaces confined to the operator's root (a user's to their own folder in it).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.backends.local import LocalBackend
from llmos.engine.async_engine import AsyncEngine
from llmos.kernel import Kernel, Program, ProgramError
from llmos.kernel.process import ProcessUsage
from llmos.kernel.program import Limits
from llmos.server.errors import APIError
from llmos.server.users import User, Users

PROGRAM_SUFFIXES = (".yaml", ".yml", ".json", ".py")
# what an inline spec from a non-admin may not set: they reach past the engine and the sandbox
_ADMIN_ONLY = {"model": "another backend", "source": "code to load", "cascade": "a cascade"}
_ADMIN_ONLY_POLICY = {"commands": "commands to run", "network": "the network"}


def default_workspace_root() -> Path:
    """Under the user's data folder (beside the kernel DB), or a temp folder."""
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    root = Path(data) / "llmos" / "workspaces"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "llmos-workspaces"
        root.mkdir(parents=True, exist_ok=True)
    return root


def programs_in(folder: str | Path) -> dict[str, Callable[[], Program]]:
    """Each program file of `folder`, by its stem, loaded anew for each spawn."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProgramError(f"--programs: {str(folder)!r} is not a folder")
    return {
        p.stem: (lambda p=p: Program.load(p))
        for p in sorted(folder.iterdir())
        if p.suffix in PROGRAM_SUFFIXES and p.is_file()
    }


@dataclass(slots=True)
class ProcessHost:
    kernel: Kernel
    workspace_root: Path
    users: Users = field(default_factory=Users)
    programs: dict[str, Callable[[], Program]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workspace_root = Path(self.workspace_root).resolve()
        if not self.workspace_root.is_dir():
            raise ProgramError(f"--workspace-root {str(self.workspace_root)!r} is not a folder")

    @classmethod
    def on_engine(
        cls,
        engine: AsyncEngine,
        db: str | Path,
        *,
        workspace_root: str | Path | None = None,
        users: Users | None = None,
        programs: dict[str, Callable[[], Program]] | None = None,
    ) -> ProcessHost:
        kernel = Kernel(backend=LocalBackend(engine), db=db)
        return cls(
            kernel,
            Path(workspace_root or default_workspace_root()),
            users or Users(),
            programs or {},
        )

    def close(self) -> None:
        self.kernel.close()

    # -- what a spawn asks for ------------------------------------------------------------
    def program(self, spec: str | dict[str, Any], user: User) -> Program:
        if isinstance(spec, str):
            make = self.programs.get(spec)
            if make is None:
                raise APIError(
                    404,
                    f"program: no program named {spec!r} on this server; "
                    f"registered: {sorted(self.programs)}",
                    param="program",
                    code="program_not_found",
                )
            return _as_request_error(make)
        if not user.admin:
            for key, what in _ADMIN_ONLY.items():
                if spec.get(key) is not None:
                    raise _forbidden(f"program.{key}", what)
            policy = spec.get("policy") or {}
            for key, what in _ADMIN_ONLY_POLICY.items():
                if isinstance(policy, dict) and policy.get(key):
                    raise _forbidden(f"program.policy.{key}", what)
        return _as_request_error(lambda: Program.from_dict(dict(spec)))

    def root_for(self, user: User) -> Path:
        """A user's own folder under the root (an admin's is the root): one user's process
        cannot name another's workspace and read its files."""
        return self.workspace_root if user.admin else self.workspace_root / (user.name or "_")

    def workspace(self, path: str | None, user: User) -> Path:
        """`path` under the caller's root (made when missing), or a new folder for this
        process."""
        root = self.root_for(user)
        if path is None:
            ws = self.workspace_root / (user.name or "local") / uuid.uuid4().hex[:12]
        else:
            if "\x00" in path or not path.strip():
                raise APIError(400, "workspace: must be a non-empty path", param="workspace")
            try:
                ws = (root / path).resolve()  # an absolute path replaces root
            except (OSError, RuntimeError) as exc:  # a symlink loop
                raise APIError(400, f"workspace: {exc}", param="workspace") from None
            if not ws.is_relative_to(root.resolve()):
                raise APIError(
                    403,
                    f"workspace: {path!r} is outside the workspace root"
                    + ("" if user.admin else f" of user {user.name!r}"),
                    param="workspace",
                    code="workspace_outside_root",
                    type="invalid_request_error",
                )
        if ws.exists() and not ws.is_dir():
            raise APIError(400, f"workspace: {path!r} is not a folder", param="workspace")
        try:
            ws.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a name too long, a file on the way
            raise APIError(
                400, f"workspace: cannot make {path!r}: {exc.strerror}", param="workspace"
            ) from None
        return ws

    def check_budget(self, user: User) -> None:
        why = self.kernel.meter.over_budget(user.name, ProcessUsage(), Limits(max_tokens=None))
        if why is not None:
            raise APIError(
                429,
                f"{why}; ask an admin to raise the budget",
                code="insufficient_quota",
                type="insufficient_quota",
            )


def _forbidden(param: str, what: str) -> APIError:
    return APIError(
        403,
        f"{param}: an inline program may name {what} only with an admin key; "
        "use a program registered on the server",
        param=param,
        code="permission_denied",
        type="invalid_request_error",
    )


def _as_request_error(make: Callable[[], Program]) -> Program:
    try:
        return make()
    except ProgramError as exc:
        raise APIError(400, f"program: {exc}", param="program", code="invalid_program") from None
