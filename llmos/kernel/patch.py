"""Unified diffs: parse them, check every hunk against the files, then write all or nothing.

`apply_patch` is the only way a program changes an existing file, so every change is a
reviewable diff in the transcript.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from llmos.kernel import sandbox
from llmos.kernel.sandbox import Refused

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass(slots=True)
class Hunk:
    old_start: int
    lines: list[str] = field(default_factory=list)  # ' ctx', '-old', '+new'


@dataclass(slots=True)
class FilePatch:
    old: str | None  # None: a new file
    new: str | None  # None: a deletion
    hunks: list[Hunk] = field(default_factory=list)


def _path(header: str) -> str | None:
    name = header.split("\t")[0].strip()
    if name == "/dev/null":
        return None
    if name.startswith(("a/", "b/")):
        name = name[2:]
    return name


def parse(text: str) -> list[FilePatch]:
    files: list[FilePatch] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            files.append(FilePatch(_path(line[4:]), _path(lines[i + 1][4:])))
            i += 2
            continue
        m = _HUNK.match(line)
        if m:
            if not files:
                raise Refused("patch: a hunk comes before any '---'/'+++' file header")
            hunk = Hunk(int(m.group(1)))
            files[-1].hunks.append(hunk)
            i += 1
            while i < len(lines) and (lines[i][:1] in (" ", "-", "+", "\\") or lines[i] == ""):
                if (
                    lines[i].startswith(("--- ", "+++ "))
                    and i + 1 < len(lines)
                    and lines[i + 1].startswith(("+++ ", "@@"))
                ):
                    break
                if not lines[i].startswith("\\"):
                    hunk.lines.append(lines[i] if lines[i] else " ")
                i += 1
            continue
        i += 1
    if not files:
        raise Refused("patch: no '--- a/PATH' / '+++ b/PATH' file headers found")
    return files


def _apply(original: list[str], fp: FilePatch, name: str) -> list[str]:
    out: list[str] = []
    pos = 0
    for n, hunk in enumerate(fp.hunks, 1):
        old = [ln[1:] for ln in hunk.lines if ln[0] in (" ", "-")]
        new = [ln[1:] for ln in hunk.lines if ln[0] in (" ", "+")]
        start = max(0, hunk.old_start - 1) if old else hunk.old_start
        # the stated line first, then the nearest place the context matches
        candidates = sorted(range(pos, len(original) - len(old) + 1), key=lambda s: abs(s - start))
        at = next((s for s in candidates if original[s : s + len(old)] == old), None)
        if at is None:
            raise Refused(
                f"patch: hunk {n} for {name!r} does not match the file's current "
                "text; read the file again and make a new diff"
            )
        out += original[pos:at] + new
        pos = at + len(old)
    return out + original[pos:]


def apply(workspace: str | Path, text: str) -> str:
    """Apply a unified diff inside the workspace; nothing is written unless every file fits."""
    writes: list[tuple[Path, bytes | None, str]] = []
    for fp in parse(text):
        name = fp.new or fp.old
        assert name is not None
        if fp.old is None:  # a new file
            target = sandbox.resolve(workspace, name, must_exist=False)
            if target.exists():
                raise Refused(f"patch: {name!r} already exists; diff against it instead")
            body = _apply([], fp, name)
            writes.append((target, ("\n".join(body) + "\n").encode() if body else b"", name))
            continue
        target = sandbox.resolve(workspace, fp.old)
        if not target.is_file():
            raise Refused(f"patch: {fp.old!r} is not a file")
        if fp.new is not None and fp.new != fp.old:
            raise Refused("patch: renaming files is not supported")
        if fp.new is None:
            writes.append((target, None, name))
            continue
        text_in = target.read_text()
        body = _apply(text_in.splitlines(), fp, name)
        end = "\n" if text_in.endswith("\n") or not text_in else ""
        writes.append((target, ("\n".join(body) + end).encode(), name))
    for target, data, name in writes:
        if data is None:
            target.unlink()
        elif target.exists():
            sandbox.replace(target, data)
        else:
            sandbox.make_parents(workspace, name)
            sandbox.write_new(target, data)
    return "applied: " + ", ".join(("deleted " if d is None else "") + n for _, d, n in writes)
