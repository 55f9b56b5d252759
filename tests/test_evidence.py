"""The answer turn's evidence (kernel/evidence.py) and search queries typed by the task
(`TaskWord`): the lines that bear on the task, with file and line; a followed pointer left
out; the task's words nothing mentions named; bounded output; and, through the kernel, a draft
answer on a tool turn becomes a fresh answer turn with no tools and no history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.backends.scripted import ScriptedBackend, call
from llmos.engine.tool_calls import ChatTools
from llmos.kernel import Kernel, Program, ProgramError, argtypes, evidence
from llmos.kernel.process import ModelTurn, Process, ToolCallStep, ToolResultStep
from llmos.kernel.tools import BUILTINS, execute
from llmos.kernel.toolspec import Policy, ToolContext


def _proc(task: str, *results: tuple[str, dict, str]) -> Process:
    """A process whose transcript holds these (tool, arguments, output) results."""
    proc = Process(pid=1, program=Program(tools=["read_file"]), input=task, workspace=".")
    for k, (name, args, output) in enumerate(results):
        cid = f"c{k}"
        proc.steps.append(ModelTurn(None, []))
        proc.steps.append(ToolCallStep(cid, name, json.dumps(args)))
        proc.steps.append(ToolResultStep(cid, name, True, output, None, ""))
    return proc


def test_lines_that_share_a_word_with_the_task_with_header_and_next_line() -> None:
    csv = "fruit,price\napple,12\nplum,46\npear,7\n"
    ini = "[apple]\nprice = 12\n\n[plum]\nprice = 46\n"
    text = evidence.answer_prompt(
        _proc(
            "What is the price of plum?",
            ("read_file", {"path": "prices.csv"}, csv),
            ("read_file", {"path": "shop.ini"}, ini),
        )
    )
    lines, task = text.split("\n\n")
    assert task == "What is the price of plum?"
    assert "prices.csv line 1: fruit,price" in lines  # the table's header
    assert "prices.csv line 3: plum,46" in lines
    assert "shop.ini line 4: [plum]" in lines and "shop.ini line 5: price = 46" in lines
    assert "pear" not in lines  # a line about something else stays out


def test_a_followed_pointer_is_left_out_and_the_newest_comes_last() -> None:
    text = evidence.answer_prompt(
        _proc(
            "What is the password? Start by reading start.txt.",
            ("read_file", {"path": "start.txt"}, "The password is in the file box.txt.\n"),
            ("read_file", {"path": "box.txt"}, "password: 591-red\n"),
        )
    )
    assert "start.txt" not in text.split("\n\n")[0]
    assert "box.txt line 1: password: 591-red" in text


def test_words_nothing_mentions_are_named() -> None:
    text = evidence.answer_prompt(
        _proc(
            "What is Bruno's home city? If the files do not say, say so.",
            ("read_file", {"path": "team.md"}, "# Team\n\nBruno joined in 2021.\n"),
        )
    )
    assert "team.md line 3: Bruno joined in 2021." in text
    assert "No file mentions: home, city." in text


def test_search_hits_keep_their_own_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "alpha.txt").write_text("Visitors sign in.\n")
    (tmp_path / "beta.txt").write_text("Bikes go in the rack.\nThe code word is nectar.\n")
    found = execute("search_files", {"query": "nectar"}, tmp_path, Policy(read_only=True))
    assert found.ok
    text = evidence.answer_prompt(
        _proc("Which file mentions nectar?", ("search_files", {"query": "nectar"}, found.output))
    )
    assert "beta.txt line 2: The code word is nectar." in text


def test_no_match_shows_the_newest_result_and_output_is_bounded() -> None:
    body = "".join(f"row {i} " + "x" * 1000 + "\n" for i in range(500))
    text = evidence.answer_prompt(_proc("Summarize it.", ("read_file", {"path": "big.txt"}, body)))
    shown = [t for t in text.split("\n\n")[0].splitlines() if t.startswith("big.txt")]
    assert len(shown) == evidence.MAX_LINES
    assert shown[0].startswith("big.txt line 1: row 0 ")
    assert max(map(len, shown)) <= evidence.MAX_CHARS + len("big.txt line 40: ")
    assert evidence.answer_prompt(_proc("Hello?")) == "Hello?"


def test_task_word_queries_are_the_task_s_words(tmp_path: Path) -> None:
    assert argtypes.task_words("Which file contains the word 'velvet'? Give its name.") == [
        "velvet"
    ]
    assert argtypes.task_words("What is the price of plum in prices.csv?") == [
        "price",
        "plum",
        "prices.csv",
    ]
    tool = BUILTINS["search_files"]
    assert tool.arg_types["query"].kind == "task_word"
    here = ToolContext(tmp_path, Policy(read_only=True), "Search the files: which one says zebra?")
    query = argtypes.resolve(tool, here, True)["function"]["parameters"]["properties"]["query"]
    assert query["enum"] == ["zebra"]
    grammar = ChatTools([argtypes.resolve(tool, here, True)], "required").grammar()
    assert '"zebra"' in grammar
    # no task: a plain string; and a call from elsewhere may search for any text
    plain = argtypes.resolve(tool, ToolContext(tmp_path, Policy()), True)
    assert "enum" not in plain["function"]["parameters"]["properties"]["query"]
    assert execute("search_files", {"query": "anything"}, tmp_path, Policy(read_only=True)).ok


def test_a_draft_answer_becomes_a_fresh_evidence_turn(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("Team notes\n\nThe release meeting is on Friday.\n")
    script = [
        {"tool_calls": [call("read_file", path="notes.txt")]},
        {"content": "a draft that is not kept"},
        {"content": "The release meeting is on Friday."},
    ]  # in call order (the answer turn's fresh prompt holds no assistant message to count)
    backend = ScriptedBackend(lambda _: script[len(backend.requests) - 1])
    program = Program(
        tools=["read_file"], tool_choice="auto", answer_turn="evidence", limits={"max_steps": 4}
    )
    with Kernel(backend=backend, db=tmp_path / "k.db") as kernel:
        p = kernel.wait(kernel.spawn(program, "What day is the release meeting?", workspace=ws))
    assert p.answer == "The release meeting is on Friday."
    last = backend.requests[-1]
    assert last.tools == [] and last.tool_choice == "none"
    assert [m["role"] for m in last.messages] == ["system", "user"]
    assert "notes.txt line 3: The release meeting is on Friday." in last.messages[1]["content"]
    turns = [s for s in p.steps if isinstance(s, ModelTurn)]
    assert [t.answering for t in turns] == [False, False, True]


def test_answer_turn_is_checked() -> None:
    with pytest.raises(ProgramError, match="answer_turn"):
        Program(answer_turn="notes")
