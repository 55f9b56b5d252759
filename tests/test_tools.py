"""The syscall table: schemas from type hints and docstrings, and the built-ins doing their
jobs inside the workspace (the escape attempts are in test_tools_sandbox.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llmos.kernel.tools import TOOLS, Policy, execute, tool


@tool(name="t_weather", read_only=True)
def weather(city: str, unit: Literal["c", "f"] = "c", days: int | None = None) -> str:
    """Tell the weather in a city.

    Args:
        city: The city's name.
        unit: Celsius or Fahrenheit.
    """
    return f"{city}: 21{unit}"


@tool(name="t_boom")
def boom(x: int) -> str:
    """Always fails."""
    raise RuntimeError(f"boom {x}")


def test_schema_comes_from_hints_and_docstring() -> None:
    t = TOOLS["t_weather"]
    assert t.description == "Tell the weather in a city."
    assert t.read_only
    assert t.parameters == {
        "type": "object",
        "additionalProperties": False,
        "required": ["city"],
        "properties": {
            "city": {"type": "string", "description": "The city's name."},
            "unit": {"enum": ["c", "f"], "description": "Celsius or Fahrenheit."},
            "days": {"type": "integer"},
        },
    }
    assert t.to_openai()["function"]["name"] == "t_weather"
    assert "ctx" not in TOOLS["read_file"].parameters["properties"]


def test_execute_runs_custom_tools_and_never_raises(tmp_path: Path) -> None:
    ok = execute("t_weather", '{"city": "Oslo"}', tmp_path)
    assert ok.ok and ok.output == "Oslo: 21c" and len(ok.sha256) == 64
    failed = execute("t_boom", {"x": 3}, tmp_path)
    assert not failed.ok and failed.error == "RuntimeError: boom 3"
    bad_json = execute("t_weather", "{city", tmp_path)
    assert not bad_json.ok and "not valid JSON" in (bad_json.error or "")
    missing = execute("t_weather", {}, tmp_path)
    assert not missing.ok and "missing" in (missing.error or "")


def test_builtins_read_list_search(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("def f():\n    return 42\n")
    assert execute("read_file", {"path": "src/m.py"}, tmp_path).output == "def f():\n    return 42"
    assert (
        execute("read_file", {"path": "src/m.py", "start_line": 2}, tmp_path).output
        == "    return 42"
    )
    assert execute("list_dir", {}, tmp_path).output == "src/"
    assert execute("search_files", {"query": "RETURN"}, tmp_path).output == "src/m.py:2: return 42"


def test_write_file_creates_only_new_files(tmp_path: Path) -> None:
    r = execute("write_file", {"path": "new/dir/a.txt", "content": "hi\n"}, tmp_path)
    assert r.ok, r.error
    assert (tmp_path / "new" / "dir" / "a.txt").read_text() == "hi\n"
    again = execute("write_file", {"path": "new/dir/a.txt", "content": "x"}, tmp_path)
    assert not again.ok and "apply_patch" in (again.error or "")


def test_apply_patch_changes_creates_and_deletes(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("one\ntwo\nthree\n")
    (tmp_path / "old.txt").write_text("bye\n")
    diff = (
        "--- a/a.py\n+++ b/a.py\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n"
        "--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1,2 @@\n+fresh\n+file\n"
        "--- a/old.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n"
    )
    r = execute("apply_patch", {"patch_text": diff}, tmp_path)
    assert r.ok, r.error
    assert (tmp_path / "a.py").read_text() == "one\nTWO\nthree\n"
    assert (tmp_path / "new.txt").read_text() == "fresh\nfile\n"
    assert not (tmp_path / "old.txt").exists()
    stale = execute("apply_patch", {"patch_text": diff.split("--- /dev/null")[0]}, tmp_path)
    assert not stale.ok and "does not match" in (stale.error or "")


def test_run_command_output_and_timeout(tmp_path: Path) -> None:
    policy = Policy(commands=["echo", "sleep", "seq"], command_timeout=0.5, max_output_chars=200)
    r = execute("run_command", {"argv": ["echo", "hi there"]}, tmp_path, policy)
    assert r.ok and r.output == "exit code 0\nhi there\n"
    slow = execute("run_command", {"argv": ["sleep", "5"]}, tmp_path, policy)
    assert not slow.ok and "timeout" in (slow.error or "")
    long = execute("run_command", {"argv": ["seq", "1", "300"]}, tmp_path, policy)
    assert long.ok and "cut" in long.output and len(long.output) < 300
