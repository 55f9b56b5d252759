"""Program code and the kernel: looking at a process (ps, logs, kill, approve, Kernel.ps)
runs none of its program's code, and each program has its own tool table, so two program
files with a tool of the same name each get their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmos.backends.scripted import ScriptedBackend, call
from llmos.kernel import Kernel, Program, Status, tool
from llmos.kernel.process import ToolResultStep

LLMOS = str(Path(sys.executable).parent / "llmos")
PROGRAM = '''
import os
from llmos.kernel import Program, tool

with open({marker!r}, "a") as f:  # a visible side effect of importing this file
    f.write(f"{{os.getpid()}}\\n")

@tool(read_only=True)
def lookup(key: str) -> str:
    """Look a key up."""
    return {prefix!r} + key

program = Program(name={name!r}, model="scripted:{turns}", tools=["lookup", "write_file"],
                  policy={{"needs_approval": ["write_file"]}})
'''


def write_program(tmp_path: Path, name: str, turns: list[dict[str, Any]], prefix: str) -> Path:
    (tmp_path / f"{name}.json").write_text(json.dumps(turns))
    path = tmp_path / f"{name}.py"
    path.write_text(
        PROGRAM.format(
            marker=str(tmp_path / f"{name}.imported"),
            prefix=prefix,
            name=name,
            turns=tmp_path / f"{name}.json",
        )
    )
    return path


def imports(tmp_path: Path, name: str) -> list[str]:
    marker = tmp_path / f"{name}.imported"
    return marker.read_text().split() if marker.exists() else []


def cli(*args: str, db: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "LLMOS_DB": str(db), "OMP_NUM_THREADS": "1"}
    env |= {k: os.environ[k] for k in ("PYTHONPATH", "HOME") if k in os.environ}
    r = subprocess.run([LLMOS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_looking_at_or_stopping_a_process_runs_no_program_code(tmp_path: Path) -> None:
    wants_write = [{"tool_calls": [call("write_file", path="n.txt", content="x")]}]
    prog = write_program(tmp_path, "marked", [*wants_write, {"content": "done"}], "m:")
    db = tmp_path / "k.db"
    with Kernel(db=db) as kernel:
        first = kernel.spawn(prog, "write a note", workspace=tmp_path)
        second = kernel.spawn(prog, "write another", workspace=tmp_path)
        for pid in (first, second):
            deadline = time.monotonic() + 30
            while kernel.get(pid).status is not Status.WAITING_APPROVAL:
                assert time.monotonic() < deadline, kernel.get(pid).status
                time.sleep(0.05)
        assert imports(tmp_path, "marked") == [str(os.getpid())]

        assert f"{first}" in cli("ps", "--all", db=db, cwd=tmp_path)
        assert "marked@1" in cli("logs", str(first), db=db, cwd=tmp_path)
        assert "denied" in cli("approve", str(first), "--deny", db=db, cwd=tmp_path)
        assert "killed" in cli("kill", str(second), "--wait", "20", db=db, cwd=tmp_path)
        listed = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from llmos import Kernel; k = Kernel(db=sys.argv[1]); "
                "print([(p.pid, p.program.name, p.status.value) for p in k.ps()]); k.close()",
                str(db),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert f"({first}, 'marked'," in listed.stdout

        assert kernel.wait(first, 30).status is Status.DONE
        assert kernel.wait(second, 30).status is Status.KILLED
    assert not (tmp_path / "n.txt").exists()  # the denied call did not run
    # only this test's own spawn imported the program: ps, logs, approve, kill, ps() did not
    assert len(imports(tmp_path, "marked")) == 1


def test_two_program_files_with_a_same_named_tool_each_get_their_own(tmp_path: Path) -> None:
    turns = [{"delay": 0.3, "tool_calls": [call("lookup", key="k")]}, {"content": "ok"}]
    a = write_program(tmp_path, "alpha", turns, "alpha says ")
    b = write_program(tmp_path, "beta", turns, "beta says ")
    with Kernel(db=tmp_path / "k.db") as kernel:
        pa = kernel.spawn(a, "look k up", workspace=tmp_path)
        pb = kernel.spawn(b, "look k up", workspace=tmp_path)
        outputs = {}
        for pid in (pa, pb):
            p = kernel.wait(pid, 30)
            assert p.status is Status.DONE, p.reason
            outputs[pid] = [s.output for s in p.steps if isinstance(s, ToolResultStep)]
    assert outputs == {pa: ["alpha says k"], pb: ["beta says k"]}


@tool(name="lookup", read_only=True)
def lookup_upper(key: str) -> str:
    """Look a key up, loudly."""
    return key.upper()


@tool(name="lookup", read_only=True)
def lookup_reversed(key: str) -> str:
    """Look a key up, backwards."""
    return key[::-1]


def test_programs_built_in_python_keep_their_own_tools(tmp_path: Path) -> None:
    turns = [{"tool_calls": [call("lookup", key="abc")]}, {"content": "ok"}]
    with Kernel(backend=ScriptedBackend(turns), db=tmp_path / "k.db") as kernel:
        pids = [
            kernel.spawn(Program(name=n, tools=[fn]), "look abc up", workspace=tmp_path)
            for n, fn in (("upper", lookup_upper), ("reversed", lookup_reversed))
        ]
        got = [
            [s.output for s in kernel.wait(pid, 30).steps if isinstance(s, ToolResultStep)]
            for pid in pids
        ]
        assert got == [["ABC"], ["cba"]]
        # a tool only one program has is not reachable from another
        with pytest.raises(ValueError, match="lookup"):
            kernel.spawn(Program(tools=["lookup"]), "x", workspace=tmp_path)


def _kernel_imports() -> dict[str, set[str]]:
    """Module → the llmos.kernel modules it imports at module level (the package's own
    __init__ re-exports are left out)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "llmos" / "kernel"
    names = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        deps: set[str] = set()
        for node in ast.parse((root / f"{name}.py").read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "llmos.kernel":
                    deps |= {a.name for a in node.names if a.name in names}
                elif node.module.startswith("llmos.kernel."):
                    deps.add(node.module.split(".")[2])
        graph[name] = deps
    return graph


def test_kernel_modules_import_without_cycles() -> None:
    graph = _kernel_imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert "tools" not in graph["builtin_tools"]  # the old cycle: tools <-> builtin_tools
