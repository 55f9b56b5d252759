"""The syscall table: schemas from type hints and docstrings, and the built-ins doing their
jobs inside the workspace (the escape attempts are in test_tools_sandbox.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import pytest

from llmos.kernel.tools import BUILTINS, Policy, Tool, execute, table, tool


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


TABLE = table([weather, boom])


def test_schema_comes_from_hints_and_docstring() -> None:
    t = weather.tool
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
    assert "ctx" not in BUILTINS["read_file"].parameters["properties"]
    assert "t_weather" not in BUILTINS  # @tool registers nothing globally


def test_execute_runs_custom_tools_and_never_raises(tmp_path: Path) -> None:
    ok = execute("t_weather", '{"city": "Oslo"}', tmp_path, table=TABLE)
    assert ok.ok and ok.output == "Oslo: 21c" and len(ok.sha256) == 64
    failed = execute("t_boom", {"x": 3}, tmp_path, table=TABLE)
    assert not failed.ok and failed.error == "RuntimeError: boom 3"
    bad_json = execute("t_weather", "{city", tmp_path, table=TABLE)
    assert not bad_json.ok and "not valid JSON" in (bad_json.error or "")
    missing = execute("t_weather", {}, tmp_path, table=TABLE)
    assert not missing.ok and "missing" in (missing.error or "")
    assert not execute("t_weather", {"city": "Oslo"}, tmp_path).ok  # not in the built-ins


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


@tool(name="t_book")
def book(
    when: Annotated[str, {"format": "date"}],
    seats: list[int],
    cls: Literal["economy", "business"] = "economy",
) -> str:
    """Book seats on a day."""
    return f"{when}: {seats} in {cls}"


PLACE = Tool(
    "t_place",
    "Go to a place.",
    {
        "type": "object",
        "properties": {
            "where": {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "name": {"type": "string"}},
                "required": ["lat"],
                "additionalProperties": False,
            }
        },
        "required": ["where"],
        "additionalProperties": False,
    },
    lambda where: f"at {where['lat']}",
)
SCHEMA_TABLE = table([book, PLACE])


@pytest.mark.parametrize(
    ("name", "args", "error"),
    [
        (
            "read_file",
            {"path": "a.txt", "start_line": "x"},
            "refused: read_file: argument 'start_line': 'x' is not of type 'integer'",
        ),
        (
            "read_file",
            {"path": "a.txt", "max_lines": True},
            "refused: read_file: argument 'max_lines': True is not of type 'integer'",
        ),
        (
            "t_book",
            {"when": "2026-12-01", "seats": [1], "cls": "first"},
            "refused: t_book: argument 'cls': 'first' is not one of ['economy', 'business']",
        ),
        (
            "t_book",
            {"when": "2026-12-01", "seats": [1, "2"]},
            "refused: t_book: argument 'seats[1]': '2' is not of type 'integer'",
        ),
        (
            "t_book",
            {"when": "next tuesday", "seats": [1]},
            "refused: t_book: argument 'when': 'next tuesday' is not a 'date'",
        ),
        (
            "t_place",
            {"where": {"lat": "north"}},
            "refused: t_place: argument 'where.lat': 'north' is not of type 'number'",
        ),
        (
            "t_place",
            {"where": {"name": "Oslo"}},
            "refused: t_place: argument 'where': 'lat' is a required property",
        ),
        (
            "t_place",
            {"where": {"lat": 1, "alt": 2}},
            "refused: t_place: argument 'where': Additional properties are not allowed "
            "('alt' was unexpected)",
        ),
    ],
)
def test_arguments_are_checked_against_the_schema(
    tmp_path: Path, name: str, args: dict[str, Any], error: str
) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    r = execute(name, args, tmp_path, table=SCHEMA_TABLE)
    assert (r.ok, r.error) == (False, error)


def test_valid_arguments_reach_the_tool(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    r = execute("t_book", {"when": "2026-12-01", "seats": [1, 2]}, tmp_path, table=SCHEMA_TABLE)
    assert r.ok and r.output == "2026-12-01: [1, 2] in economy"
    assert book.tool.parameters["properties"]["when"] == {"type": "string", "format": "date"}
    place = execute("t_place", {"where": {"lat": 59.9}}, tmp_path, table=SCHEMA_TABLE)
    assert place.ok and place.output == "at 59.9"
    # JSON has one number type: 2.0 is a valid integer, and the tool gets the int 2
    r = execute("read_file", {"path": "a.txt", "start_line": 2.0}, tmp_path)
    assert r.ok and r.output == "two"
