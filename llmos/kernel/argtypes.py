"""Tool arguments typed by the environment (`WorkspaceFile`, `WorkspaceDir`, `NewPath`,
`AllowedCommand`, `CommandLine`, `Choices(fn)`, `TaskWord`: see toolspec.py), turned into each model
call's schema and checked again when the call runs.

- `resolve(tool, ctx, enforced)` is the tool's OpenAI entry for this call. Where the backend
  enforces schemas with a grammar (the local engine), a typed argument becomes the `enum` of
  the real values, or, past `ENUM_MAX` of them, a path pattern (the real folders exactly, then
  a file name) so the grammar stays cheap at 10k files. Where it does not (a remote server), an
  `enum` is sent only while it is short (`REMOTE_ENUM_MAX`); otherwise a plain string.
- `check(tool, args, ctx)` runs in `execute`: a value the workspace does not have is refused
  with the nearest valid choices named, so a model (or a remote backend) that got it wrong
  is told what is there.
- `listing(root)` is the workspace's files and folders, without ignored folders (.git, .venv,
  node_modules, __pycache__, any hidden folder), bounded, and cached until a folder changes
  (one `stat` per folder decides), so the next call after a write sees the new state.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.kernel import sandbox
from llmos.kernel.sandbox import Refused
from llmos.kernel.toolspec import ArgType, Tool, ToolContext

IGNORED_DIRS = frozenset(
    {"node_modules", "__pycache__", "venv", "env", "site-packages", "dist-packages"}
)  # and every folder whose name starts with "." (.git, .venv, .mypy_cache, ...)
MAX_ENTRIES = 50_000  # files and folders listed at most; past it the pattern covers the rest
ENUM_MAX = 512  # values a grammar-enforced enum lists; past it, a path pattern
REMOTE_ENUM_MAX = 64  # values sent as an enum to a backend that may not enforce it
DIR_PATTERN_MAX = 2000  # folders spelled out in a path pattern; past it, any folder name
NEAREST = 5  # valid choices named in a refusal
_NAME = r"[^/\x00-\x1f]+"  # one path component (the sandbox refuses '..' and the rest)


@dataclass(frozen=True, slots=True)
class Listing:
    files: tuple[str, ...]  # relative POSIX paths, sorted
    dirs: tuple[str, ...]  # "." first, then relative folders, sorted
    complete: bool  # False: cut at MAX_ENTRIES


_cache: dict[Path, tuple[dict[str, int], Listing]] = {}
_lock = threading.Lock()


def ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_DIRS


def _walk(root: Path) -> tuple[dict[str, int], Listing]:
    stamps: dict[str, int] = {}
    files: list[str] = []
    dirs: list[str] = []
    pending = [""]
    complete = True
    while pending:
        rel = pending.pop()
        folder = os.path.join(root, rel) if rel else str(root)
        try:
            stamps[folder] = os.stat(folder).st_mtime_ns
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if len(files) + len(dirs) >= MAX_ENTRIES:
                complete = False
                break
            path = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                if not ignored(e.name):
                    dirs.append(path)
                    pending.append(path)
            elif e.is_file(follow_symlinks=False):
                files.append(path)
    return stamps, Listing(tuple(sorted(files)), (".", *sorted(dirs)), complete)


def listing(workspace: str | Path) -> Listing:
    """The workspace's files and folders now. Cached while no listed folder's mtime changes
    (creating, removing or renaming an entry changes its folder's)."""
    root = Path(workspace).resolve()
    with _lock:
        hit = _cache.get(root)
    if hit is not None:
        stamps, found = hit
        try:
            if all(os.stat(d).st_mtime_ns == t for d, t in stamps.items()):
                return found
        except OSError:
            pass
    stamps, found = _walk(root)
    with _lock:
        if len(_cache) > 256:
            _cache.clear()
        _cache[root] = (stamps, found)
    return found


def values(arg: ArgType, ctx: ToolContext) -> list[str] | None:
    """Every value the argument admits now, or None where they cannot be listed (a new path)."""
    if arg.kind == "file":
        return list(listing(ctx.workspace).files)
    if arg.kind == "dir":
        return list(listing(ctx.workspace).dirs)
    if arg.kind in ("command", "argv"):
        return sorted(ctx.policy.commands)
    if arg.kind == "choices":
        assert arg.choices is not None
        return [str(v) for v in arg.choices(ctx)]
    if arg.kind == "task_word":
        return task_words(ctx.task) or None
    return None


# Words a question is made of rather than about: never a search query.
QUESTION_WORDS = frozenset(
    """a an the and or but if so of on in at to for by from with as is are was were be been
    am do does did done can could will would should may might must shall what which who whom
    whose when where why how much many there here this that these those it its they them their
    you your we our i me my he she his her not no yes any some all each one ones file files
    folder folders say says said tell find search look give name mention mentions mentioned
    appear appears contain contains word words read reading start check please answer question
    according about""".split()
)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*[A-Za-z0-9]|[A-Za-z0-9]")


def task_words(task: str) -> list[str]:
    """A task's quoted phrases, then its words of three letters or more that are not question
    words, in order, once each: the values a `TaskWord` argument admits."""
    quoted = re.findall(r"'([^'\n]{2,60})'|\"([^\"\n]{2,60})\"", task)
    out = [a or b for a, b in quoted]
    for w in _WORD.findall(task):
        w = w.rstrip(".")
        if len(w) >= 3 and w.lower() not in QUESTION_WORDS:
            out.append(w)
    return list(dict.fromkeys(out))


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}-" else c for c in text)


def path_pattern(found: Listing) -> str:
    """A regex for 'a file in one of these folders': the folders exactly (while they are not
    too many), then one name. Cheap for llguidance where a 10k-path enum is not."""
    dirs = [d for d in found.dirs if d != "."]
    if len(dirs) > DIR_PATTERN_MAX or not found.complete:
        return f"^({_NAME}/)*{_NAME}$"
    if not dirs:
        return f"^{_NAME}$"
    return f"^(({'|'.join(_escape(d) for d in dirs)})/)?{_NAME}$"


NEW_PATH_PATTERN = f"^({_NAME}/)*{_NAME}$"


def _typed_schema(
    base: dict[str, Any], arg: ArgType, ctx: ToolContext, enforced: bool
) -> dict[str, Any]:
    out = {k: v for k, v in base.items() if k != "x-llmos"}
    limit = ENUM_MAX if enforced else REMOTE_ENUM_MAX
    choices = values(arg, ctx)
    if arg.kind == "argv":
        if choices is not None and len(choices) <= limit:
            out["prefixItems"] = [{"type": "string", "enum": choices}]
            out["items"] = {"type": "string"}
            out["minItems"] = 1
        return out
    if choices is not None and len(choices) <= limit and (choices or arg.kind != "file"):
        out["enum"] = choices
        return out
    if enforced and arg.kind in ("file", "dir", "new_path"):
        found = listing(ctx.workspace)
        if arg.kind == "file":
            out["pattern"] = path_pattern(found)
        else:
            out["pattern"] = NEW_PATH_PATTERN
    return out


def resolve(tool: Tool, ctx: ToolContext | None, enforced: bool) -> dict[str, Any]:
    """The tool's OpenAI entry for one model call: typed arguments as the workspace has them
    now (`ctx` None: the plain static schema, markers dropped)."""
    entry = tool.to_openai()
    if not tool.arg_types:
        return entry
    params = dict(entry["function"]["parameters"])
    props = dict(params.get("properties", {}))
    for name, arg in tool.arg_types.items():
        if name not in props:
            continue
        base = props[name]
        if ctx is None:
            props[name] = {k: v for k, v in base.items() if k != "x-llmos"}
            continue
        props[name] = _typed_schema(base, arg, ctx, enforced)
    params["properties"] = props
    entry["function"] = {**entry["function"], "parameters": params}
    return entry


def _nearest(value: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(value, choices, n=NEAREST, cutoff=0.3)
    base = os.path.basename(value)
    near += [c for c in choices if base and os.path.basename(c) == base and c not in near]
    near = near[:NEAREST] or choices[:NEAREST]
    more = f" (of {len(choices)})" if len(choices) > len(near) else ""
    return ", ".join(repr(c) for c in near) + more if near else "none"


def check(tool: Tool, args: dict[str, Any], ctx: ToolContext) -> None:
    """Refuse a typed argument the workspace (or policy) does not admit now, naming the nearest
    valid choices."""
    for name, arg in tool.arg_types.items():
        if name not in args:
            continue
        value = args[name]
        where = f"{tool.name}: argument {name!r}"
        if arg.kind == "argv":
            value = value[0] if isinstance(value, list) and value else ""
            where += "[0]"
        if not isinstance(value, str) or arg.kind == "task_word":
            continue  # refused by the JSON schema check already; any query text may run
        if arg.kind in ("file", "dir", "new_path"):
            _check_path(where, value, arg.kind, ctx)
            continue
        choices = values(arg, ctx) or []
        if value not in choices:
            what = "an allowed command" if arg.kind in ("command", "argv") else "a valid choice"
            raise Refused(
                f"{where}: {value!r} is not {what}; the choices are: {_nearest(value, choices)}"
            )


def _check_path(where: str, value: str, kind: str, ctx: ToolContext) -> None:
    if kind == "dir" and value in (".", "./", ""):
        return
    if kind == "new_path":
        target = sandbox.resolve(ctx.workspace, value, must_exist=False)
        if target.exists():
            raise Refused(
                f"{where}: {value!r} exists already; this argument takes a new path "
                "(an existing file changes with apply_patch)"
            )
        return
    found = listing(ctx.workspace)
    try:
        target = sandbox.resolve(ctx.workspace, value)
    except Refused as exc:
        if "does not exist" not in str(exc):
            raise
        pool = list(found.files if kind == "file" else found.dirs)
        noun = "file" if kind == "file" else "folder"
        raise Refused(
            f"{where}: {noun} {value!r} does not exist in the workspace; the nearest {noun}s are: "
            f"{_nearest(value, pool)}"
        ) from None
    if kind == "file" and not target.is_file():
        inside = [f for f in found.files if f.startswith(value.rstrip("/") + "/")]
        raise Refused(
            f"{where}: {value!r} is a folder, not a file; files in it: "
            f"{_nearest(value + '/', inside)}"
        )
    if kind == "dir" and not target.is_dir():
        raise Refused(f"{where}: {value!r} is a file, not a folder; use read_file")
