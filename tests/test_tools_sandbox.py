"""Escape attempts against the built-in tools: each is refused (ok=False, never an exception)
and nothing outside the workspace is read into the result, created, changed or deleted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from llmos.kernel.tools import Policy, ToolResult, execute

SECRET = "TOPSECRET-42"
POLICY = Policy(
    commands=["cat", "ls", "echo", "env", "sleep", "yes", "head", "true"],
    command_timeout=1.0,
    max_output_chars=2000,
    max_file_bytes=10_000,
)
PATCH_OUT = """--- a/../outside/secret.txt
+++ b/../outside/secret.txt
@@ -1 +1 @@
-TOPSECRET-42
+pwned
"""


def _patch(old: str, new: str, before: str = "x", after: str = "pwned") -> str:
    return f"--- {old}\n+++ {new}\n@@ -1 +1 @@\n-{before}\n+{after}\n"


NEW_FILE_PATCH = "--- /dev/null\n+++ {path}\n@@ -0,0 +1 @@\n+pwned\n"

ATTEMPTS: list[tuple[str, str, dict[str, Any]]] = [
    # path traversal
    ("traversal", "read_file", {"path": "../outside/secret.txt"}),
    ("traversal-nested", "read_file", {"path": "sub/../../outside/secret.txt"}),
    ("traversal-dot", "read_file", {"path": "./../outside/secret.txt"}),
    ("traversal-backslash", "read_file", {"path": "..\\outside\\secret.txt"}),
    ("traversal-doubleslash", "read_file", {"path": "sub/..//../outside/secret.txt"}),
    ("traversal-list", "list_dir", {"path": ".."}),
    ("traversal-list-sibling", "list_dir", {"path": "../outside"}),
    ("traversal-search", "search_files", {"query": "secret", "path": ".."}),
    ("traversal-write", "write_file", {"path": "../outside/evil.txt", "content": "x"}),
    # absolute paths
    ("absolute-etc", "read_file", {"path": "/etc/passwd"}),
    ("absolute-outside", "read_file", {"path": "{outside}/secret.txt"}),
    ("home-tilde", "read_file", {"path": "~/.bashrc"}),
    ("absolute-list-root", "list_dir", {"path": "/"}),
    ("absolute-write", "write_file", {"path": "{outside}/evil.txt", "content": "x"}),
    ("windows-drive", "read_file", {"path": "C:\\Windows\\win.ini"}),
    ("proc-environ", "read_file", {"path": "/proc/self/environ"}),
    ("nul-byte", "read_file", {"path": "a.txt\x00../../etc/passwd"}),
    # symlinks out
    ("symlink-dir", "read_file", {"path": "link_out/secret.txt"}),
    ("symlink-file", "read_file", {"path": "link_secret"}),
    ("symlink-list", "list_dir", {"path": "link_out"}),
    ("symlink-write-into", "write_file", {"path": "link_out/evil.txt", "content": "x"}),
    ("symlink-dangling-write", "write_file", {"path": "link_new", "content": "x"}),
    ("symlink-relative-up", "read_file", {"path": "sub/uplink/secret.txt"}),
    ("symlink-search", "search_files", {"query": "secret", "path": "link_out"}),
    # hard links to a file outside
    ("hardlink-read", "read_file", {"path": "hard.txt"}),
    ("hardlink-command", "run_command", {"argv": ["cat", "hard.txt"]}),
    ("hardlink-patch", "apply_patch", {"patch_text": _patch("a/hard.txt", "b/hard.txt", SECRET)}),
    ("cmd-history-expansion", "run_command", {"argv": ["echo", "alias.x=!id"]}),
    # devices and special files
    ("device-symlink", "read_file", {"path": "dev_zero"}),
    ("fifo", "read_file", {"path": "fifo"}),
    ("too-big", "read_file", {"path": "big.txt"}),
    # writes that are not allowed
    ("overwrite-existing", "write_file", {"path": "a.txt", "content": "pwned"}),
    # patches aimed outside
    ("patch-traversal", "apply_patch", {"patch_text": PATCH_OUT}),
    (
        "patch-absolute-new",
        "apply_patch",
        {"patch_text": NEW_FILE_PATCH.format(path="{outside}/evil.txt")},
    ),
    (
        "patch-symlink",
        "apply_patch",
        {"patch_text": _patch("a/link_secret", "b/link_secret", SECRET)},
    ),
    (
        "patch-new-through-symlink",
        "apply_patch",
        {"patch_text": NEW_FILE_PATCH.format(path="b/link_out/evil.txt")},
    ),
    (
        "patch-half-outside",
        "apply_patch",
        {"patch_text": _patch("a/a.txt", "b/a.txt", "hello") + PATCH_OUT},
    ),
    (
        "patch-absolute-old",
        "apply_patch",
        {"patch_text": _patch("{outside}/secret.txt", "{outside}/secret.txt", SECRET)},
    ),
    # commands
    ("cmd-shell", "run_command", {"argv": ["sh", "-c", "cat /etc/passwd"]}),
    ("cmd-bash", "run_command", {"argv": ["bash", "-c", "id"]}),
    ("cmd-python", "run_command", {"argv": ["python3", "-c", "print(open('/etc/passwd').read())"]}),
    ("cmd-metachar-argv0", "run_command", {"argv": ["ls;cat", "/etc/passwd"]}),
    ("cmd-path-argv0", "run_command", {"argv": ["/bin/cat", "a.txt"]}),
    ("cmd-relative-argv0", "run_command", {"argv": ["./evil.sh"]}),
    ("cmd-absolute-arg", "run_command", {"argv": ["cat", "/etc/passwd"]}),
    ("cmd-traversal-arg", "run_command", {"argv": ["cat", "../outside/secret.txt"]}),
    ("cmd-option-path", "run_command", {"argv": ["ls", "--directory={outside}"]}),
    ("cmd-symlink-arg", "run_command", {"argv": ["cat", "link_secret"]}),
    ("cmd-subst", "run_command", {"argv": ["echo", "$(cat ../outside/secret.txt)"]}),
    ("cmd-backtick", "run_command", {"argv": ["echo", "`id`"]}),
    ("cmd-semicolon", "run_command", {"argv": ["echo", "hi; cat /etc/passwd"]}),
    ("cmd-pipe", "run_command", {"argv": ["ls", "|", "sh"]}),
    ("cmd-redirect", "run_command", {"argv": ["echo", "x", ">", "evil"]}),
    ("env-probe-var", "run_command", {"argv": ["echo", "$LLMOS_TEST_SECRET"]}),
    ("env-printenv", "run_command", {"argv": ["printenv", "LLMOS_TEST_SECRET"]}),
    ("cmd-runaway", "run_command", {"argv": ["sleep", "30"]}),
    ("cmd-huge-output", "run_command", {"argv": ["yes"]}),
    ("cmd-string-argv", "run_command", {"argv": "cat /etc/passwd"}),
    ("cmd-empty", "run_command", {"argv": []}),
    # the syscall table itself
    ("unknown-tool", "shell", {"cmd": "id"}),
    ("extra-argument", "read_file", {"path": "a.txt", "follow_symlinks": True}),
    ("wrong-type", "read_file", {"path": ["a.txt"]}),
]


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | str]]:
    out: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(root))] = (
            st.st_mtime_ns,
            os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else b"",
        )
    return out


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("LLMOS_TEST_SECRET", SECRET)
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET + "\n")
    (ws / "a.txt").write_text("hello\n")
    (ws / "big.txt").write_text("x" * 20_000)
    (ws / "sub").mkdir()
    (ws / "link_out").symlink_to(outside)
    (ws / "link_secret").symlink_to(outside / "secret.txt")
    (ws / "link_new").symlink_to(outside / "new.txt")
    (ws / "sub" / "uplink").symlink_to(Path("..") / ".." / "outside")
    (ws / "dev_zero").symlink_to("/dev/zero")
    os.mkfifo(ws / "fifo")
    os.link(outside / "secret.txt", ws / "hard.txt")
    return ws, outside


@pytest.mark.parametrize(("name", "tool", "args"), ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
def test_escape_attempt_is_refused(
    sandbox: tuple[Path, Path], name: str, tool: str, args: dict[str, Any]
) -> None:
    ws, outside = sandbox

    def fill(v: Any) -> Any:
        if isinstance(v, list):
            return [fill(x) for x in v]
        return v.replace("{outside}", str(outside)) if isinstance(v, str) else v

    args = {k: fill(v) for k, v in args.items()}
    before_out, before_ws = _snapshot(outside), _snapshot(ws)
    before_root = sorted(p.name for p in ws.parent.iterdir())
    result = execute(tool, args, ws, POLICY)
    assert isinstance(result, ToolResult)
    assert not result.ok, f"{name} was not refused: {result.output[:200]!r}"
    assert result.error
    assert SECRET not in result.error and "root:" not in result.error
    assert _snapshot(outside) == before_out, f"{name} touched a file outside the workspace"
    assert _snapshot(ws) == before_ws, f"{name} changed the workspace"
    assert sorted(p.name for p in ws.parent.iterdir()) == before_root
    assert not (outside / "new.txt").exists() and not (outside / "evil.txt").exists()


def test_at_least_forty_distinct_attempts_are_refused_by_a_guard(
    sandbox: tuple[Path, Path],
) -> None:
    """What the code did with the attempts, not how many the list holds: at least forty
    different attempts each come back refused by a sandbox or policy check (a "refused:"
    reason of its own), none by a tool crashing on them."""
    ws, outside = sandbox
    reasons: dict[str, str] = {}
    for name, tool, args in ATTEMPTS:
        filled = json.loads(json.dumps(args).replace("{outside}", str(outside)))
        result = execute(tool, filled, ws, POLICY)
        assert not result.ok and (result.error or "").startswith("refused: "), (name, result)
        reasons[name] = result.error or ""
    assert len(set(reasons.values())) >= 40, reasons


def test_environment_is_scrubbed(sandbox: tuple[Path, Path]) -> None:
    ws, _ = sandbox
    result = execute("run_command", {"argv": ["env"]}, ws, POLICY)
    assert result.ok, result.error
    assert SECRET not in result.output and "LLMOS_TEST_SECRET" not in result.output
    assert f"HOME={ws.resolve()}" in result.output


def test_search_skips_symlinks_out(sandbox: tuple[Path, Path]) -> None:
    ws, _ = sandbox
    result = execute("search_files", {"query": "secret"}, ws, POLICY)
    assert (result.ok, result.output) == (True, "no matches")


def test_read_only_policy_and_allowed_tools(sandbox: tuple[Path, Path]) -> None:
    ws, _ = sandbox
    ro = execute("write_file", {"path": "n.txt", "content": "x"}, ws, Policy(read_only=True))
    assert not ro.ok and "read-only" in (ro.error or "")
    narrow = execute(
        "run_command", {"argv": ["ls"]}, ws, Policy(allowed_tools=["read_file"], commands=["ls"])
    )
    assert not narrow.ok and "not allowed" in (narrow.error or "")
    assert not (ws / "n.txt").exists()
