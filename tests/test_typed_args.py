"""Tool arguments typed by the environment: each call's schema holds the real paths (an enum,
or a path pattern past ENUM_MAX), ignored folders stay out, the workspace's changes show at the
next call, long enums stay out of the prompt, and `execute` names the nearest valid choices."""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmos.backends.scripted import ScriptedBackend, call
from llmos.engine.tool_calls import PROMPT_ENUM_MAX, ChatTools, _tool_prompt
from llmos.kernel import Kernel, Program, argtypes, tool
from llmos.kernel.tools import BUILTINS, execute
from llmos.kernel.toolspec import Choices, Policy, ToolContext, WorkspaceFile


def _ws(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("The release meeting is on Friday.\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "plan.md").write_text("# Plan\n")
    for hidden in (".git", "node_modules", "__pycache__", ".venv"):
        (tmp_path / hidden).mkdir()
        (tmp_path / hidden / "x.txt").write_text("ignored\n")
    return tmp_path


def _path_schema(entry: dict) -> dict:
    return entry["function"]["parameters"]["properties"]["path"]


def test_builtins_declare_typed_arguments() -> None:
    assert BUILTINS["read_file"].arg_types["path"].kind == "file"
    assert BUILTINS["list_dir"].arg_types["path"].kind == "dir"
    assert BUILTINS["write_file"].arg_types["path"].kind == "new_path"
    assert BUILTINS["run_command"].arg_types["argv"].kind == "argv"
    assert BUILTINS["read_file"].parameters["properties"]["path"]["x-llmos"] == "file"


def test_schema_is_the_workspace_now(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    ctx = ToolContext(ws, Policy())
    entry = argtypes.resolve(BUILTINS["read_file"], ctx, enforced=True)
    assert _path_schema(entry)["enum"] == ["docs/plan.md", "notes.txt"]  # no ignored folders
    assert "x-llmos" not in _path_schema(entry)
    assert _path_schema(argtypes.resolve(BUILTINS["list_dir"], ctx, True))["enum"] == [".", "docs"]
    (ws / "new.txt").write_text("fresh\n")  # a write between turns: the next call sees it
    assert "new.txt" in _path_schema(argtypes.resolve(BUILTINS["read_file"], ctx, True))["enum"]
    (ws / "notes.txt").unlink()
    assert (
        "notes.txt" not in _path_schema(argtypes.resolve(BUILTINS["read_file"], ctx, True))["enum"]
    )
    plain = argtypes.resolve(BUILTINS["read_file"], None, True)  # typed_args off
    assert _path_schema(plain) == {
        "type": "string",
        "description": "The file, relative to the workspace.",
    }
    argv = argtypes.resolve(BUILTINS["run_command"], ToolContext(ws, Policy(commands=["ls"])), True)
    assert argv["function"]["parameters"]["properties"]["argv"]["prefixItems"][0]["enum"] == ["ls"]


def test_large_workspace_gets_a_pattern_and_a_short_prompt(tmp_path: Path) -> None:
    for i in range(argtypes.ENUM_MAX + 100):
        d = tmp_path / f"d{i % 7}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.txt").write_text("x")
    ctx = ToolContext(tmp_path, Policy())
    start = time.perf_counter()
    local = _path_schema(argtypes.resolve(BUILTINS["read_file"], ctx, enforced=True))
    assert time.perf_counter() - start < 1.0
    assert "enum" not in local and local["pattern"].startswith("^((d0|d1")
    remote = _path_schema(argtypes.resolve(BUILTINS["read_file"], ctx, enforced=False))
    assert "enum" not in remote and "pattern" not in remote  # refused at execute instead
    long_enum = {"type": "string", "enum": [f"x{i}" for i in range(5000)]}
    params = {"type": "object", "properties": {"p": long_enum}}
    few = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    prompt = _tool_prompt(few, parallel=False)
    assert len(prompt) < 2000 and f"the first {PROMPT_ENUM_MAX} shown" in prompt


def test_execute_names_the_nearest_choices(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    r = execute("read_file", {"path": "note.txt"}, ws)
    assert not r.ok and "does not exist" in r.error and "'notes.txt'" in r.error
    r = execute("read_file", {"path": "docs"}, ws)
    assert not r.ok and "is a folder" in r.error and "docs/plan.md" in r.error
    r = execute("list_dir", {"path": "doc"}, ws)
    assert not r.ok and "'docs'" in r.error
    r = execute("write_file", {"path": "notes.txt", "content": "x"}, ws)
    assert not r.ok and "new path" in r.error
    r = execute("run_command", {"argv": ["rm", "-rf", "x"]}, ws, Policy(commands=["ls"]))
    assert not r.ok and "'ls'" in r.error
    assert execute("read_file", {"path": "notes.txt"}, ws).ok


@tool(read_only=True)
def pick_color(
    color: Choices(lambda ctx: sorted(p.stem for p in ctx.workspace.glob("*.color"))),
) -> str:
    """Pick one of the colours the workspace defines.

    Args:
        color: The colour.
    """
    return f"picked {color}"


@tool(read_only=True)
def open_file(path: WorkspaceFile) -> str:
    """Open a file.

    Args:
        path: Which file.
    """
    return path


def test_choices_are_computed_at_call_time(tmp_path: Path) -> None:
    (tmp_path / "red.color").write_text("")
    ctx = ToolContext(tmp_path, Policy())
    schema = argtypes.resolve(pick_color.tool, ctx, True)["function"]["parameters"]
    assert schema["properties"]["color"]["enum"] == ["red"]
    table = {"pick_color": pick_color.tool}
    assert not execute("pick_color", {"color": "blue"}, tmp_path, table=table).ok
    (tmp_path / "blue.color").write_text("")
    assert execute("pick_color", {"color": "blue"}, tmp_path, table=table).output == "picked blue"


def test_each_model_call_sees_the_workspace(tmp_path: Path) -> None:
    """Through the kernel: the request's schema is today's listing (unchanged by the reads),
    and a custom @tool with WorkspaceFile gets the same."""
    (tmp_path / "ws").mkdir()
    ws = _ws(tmp_path / "ws")
    backend = ScriptedBackend(
        [{"tool_calls": [call("read_file", path="notes.txt")]}, {"content": "Friday."}]
    )
    program = Program(tools=["read_file", open_file], tool_choice="auto", limits={"max_steps": 3})
    with Kernel(backend=backend, db=tmp_path / "k.db") as kernel:
        p = kernel.wait(kernel.spawn(program, "When?", workspace=ws))
    assert p.answer == "Friday."
    first, second = (
        {t["function"]["name"]: dict(_path_schema(t)) for t in r.tools} for r in backend.requests
    )
    assert first["read_file"]["enum"] == ["docs/plan.md", "notes.txt"]
    assert first["open_file"]["enum"] == ["docs/plan.md", "notes.txt"]
    # a read already made: the grammar leaves it out, the prompt (and its cached KV) stays
    assert second["read_file"].pop("x-llmos-skip") == ["notes.txt"]
    assert second == first
    tools = backend.requests[1].tools
    grammar = ChatTools(tools, "required").grammar()
    (read_rule,) = [ln for ln in grammar.splitlines() if ln.startswith("call_0: %json")]
    assert '"notes.txt"' not in read_rule and '"docs/plan.md"' in read_rule
    assert _tool_prompt(tools, False) == _tool_prompt(backend.requests[0].tools, False)
    assert json.dumps(first).count("x.txt") == 0


def test_an_answer_that_restates_a_tool_error_gets_one_retry(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    ws = _ws(tmp_path / "ws")
    backend = ScriptedBackend(
        [
            {"tool_calls": [call("read_file", path="note.txt")]},
            {"content": "Error: the file note.txt does not exist."},
            {"tool_calls": [call("read_file", path="notes.txt")]},
            {"content": "Friday."},
        ]
    )
    program = Program(tools=["read_file"], tool_choice="auto", limits={"max_steps": 6})
    with Kernel(backend=backend, db=tmp_path / "k.db") as kernel:
        p = kernel.wait(kernel.spawn(program, "When is the meeting?", workspace=ws))
    assert p.answer == "Friday."
    retry = backend.requests[2].messages[-1]
    assert retry["role"] == "user" and "'notes.txt'" in retry["content"]
    assert "only repeats the tool's error" in retry["content"]
