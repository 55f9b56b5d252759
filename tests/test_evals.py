"""llmos.evals without a model: suites (promptfoo's subset, the matrix, errors that name the
field), assertions, statistics, gates, history in a real SQLite file, and the reports."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmos.cli.main import app
from llmos.evals import assertions, gates, history, report
from llmos.evals.providers import Output
from llmos.evals.runner import pass_hat_k, percentile, wilson
from llmos.evals.suite import SuiteError, load_suite


def write(tmp: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


BASIC = """
description: basic
prompts: ["Q: {{q}}", {id: terse, raw: "Answer briefly: {{q}}"}]
providers:
  - local:smollm2-135m
  - {id: "openai_http:smollm2-135m@http://127.0.0.1:9/v1", label: remote}
defaultTest:
  vars: {lang: en}
  assert: [{type: max-cost, value: 1.0}]
tests:
  - description: Capital of France
    vars: {q: "capital?"}
    assert: [{type: icontains, value: paris}, {type: not-contains, value: Berlin, weight: 2}]
  - file://cases.jsonl
matrix:
  sampling: [{temperature: 0}, {temperature: 0.8, seed: 1}]
  engine: [{deterministic: true}, {quantization: q8}]
gates: {pass_rate: 0.5, test_pass_k: {capital-of-france: 1.0}}
"""


def test_suite_loads_promptfoo_shape_and_crosses_the_matrix(tmp_path: Path) -> None:
    (tmp_path / "cases.jsonl").write_text(
        '{"vars": {"q": "two plus two"}, "assert": [{"type": "numeric", "value": 4}]}\n'
        '{"q": "bare vars line"}\n'
    )
    suite = load_suite(write(tmp_path, BASIC))
    assert [c.id for c in suite.cases] == ["capital-of-france", "test-2", "test-3"]
    assert suite.cases[0].vars == {"lang": "en", "q": "capital?"}  # defaultTest vars merged
    assert [a.type for a in suite.cases[0].asserts] == ["max-cost", "icontains", "contains"]
    assert suite.cases[0].asserts[2].negate and suite.cases[0].asserts[2].weight == 2
    assert suite.cases[2].vars["q"] == "bare vars line"
    # local: 2 prompts x 2 engines x 2 samplings; remote: 2 prompts x 2 samplings (no engine)
    local = [c for c in suite.cells if c.kind == "local"]
    remote = [c for c in suite.cells if c.kind == "openai_http"]
    assert len(local) == 8 and len(remote) == 4
    assert remote[0].url == "http://127.0.0.1:9/v1" and remote[0].model == "smollm2-135m"
    assert len({c.id for c in suite.cells}) == 12
    keys = {c.engine_key for c in local}
    assert len(keys) == 2  # sampling differences share one engine; flags do not
    assert local[1].engine == {"deterministic": True}
    assert local[1].sampling == {"temperature": 0.8, "seed": 1}
    # the hash covers the JSONL cases too
    before = suite.hash
    (tmp_path / "cases.jsonl").write_text('{"q": "other"}\n')
    assert load_suite(tmp_path / "suite.yaml").hash != before


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("providers: [local]\ntests: [{vars: {}}]\nbogus: 1\n", "bogus"),
        ("providers: [nope:x]\ntests: [{vars: {}}]\n", "providers[0]"),
        ("providers: [local]\ntests: [{assert: [{type: shouts}]}]\n", "tests[0].assert[0].type"),
        (
            "providers: [local]\ntests: [{assert: [{type: regex, value: '('}]}]\n",
            "tests[0].assert[0]",
        ),  # noqa: E501
        ("providers: [{id: local, config: {temprature: 0}}]\ntests: [{}]\n", "temprature"),
        ("providers: [local]\ntests: [{}]\ngates: {pass_rat: 1}\n", "pass_rat"),
        (
            "providers: [local]\ntests: [{}]\nmatrix: {engine: [{turbo: true}]}\n",
            "matrix.engine[0]",
        ),  # noqa: E501
        ("providers: [local]\ntests: [{choices: [a, b], answer: c}]\n", "tests[0].answer"),
        ("providers: [local]\ntests: file://missing.jsonl\n", "missing.jsonl"),
        (
            "providers: [local]\ntests: [{assert: [{type: similar, value: x, method: embed}]}]\n",
            "tests[0].assert[0]: similar's method .* no embeddings",
        ),
        ("providers: []\ntests: [{}]\n", "providers"),
        ("providers: [local]\ntests: [{assert: [{type: is-json, value: {type: 5}}]}]\n", "schema"),
    ],
)
def test_bad_suites_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(SuiteError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_suite(write(tmp_path, text))


def test_cli_exits_2_on_a_configuration_error(tmp_path: Path) -> None:
    path = write(tmp_path, "providers: [local]\ntests: [{assert: [{type: shouts}]}]\n")
    result = CliRunner().invoke(app, ["eval", str(path), "--db", str(tmp_path / "h.db")])
    assert result.exit_code == 2
    assert "unknown assertion 'shouts'" in result.output
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def grade(spec: dict, out: Output, vars: dict | None = None, base: Path = Path(".")) -> dict:
    from llmos.evals.suite import _assertion

    a = _assertion(spec, "t")
    return asyncio.run(assertions.grade(a, out, assertions.Context(vars or {}, base)))


@pytest.mark.parametrize(
    ("spec", "text", "passed"),
    [
        ({"type": "equals", "value": "Paris"}, " Paris\n", True),
        ({"type": "equals", "value": "{{city}}"}, "Paris", True),
        ({"type": "equals", "value": {"a": 1}}, '{"a": 1}', True),
        ({"type": "contains", "value": "Par"}, "in Paris", True),
        ({"type": "contains", "value": "par"}, "in Paris", False),
        ({"type": "icontains", "value": "par"}, "in Paris", True),
        ({"type": "not-icontains", "value": "par"}, "in Paris", False),
        ({"type": "contains-any", "value": ["x", "Paris"]}, "in Paris", True),
        ({"type": "contains-all", "value": ["x", "Paris"]}, "in Paris", False),
        ({"type": "regex", "value": r"\b\d{3}\b"}, "code 123 here", True),
        ({"type": "starts-with", "value": "The"}, "  The end", True),
        ({"type": "is-json"}, '```json\n{"a": 1}\n```', True),
        ({"type": "is-json"}, "{a: 1}", False),
        (
            {"type": "json-schema", "value": {"type": "object", "required": ["b"]}},
            '{"a": 1}',
            False,
        ),  # noqa: E501
        ({"type": "is-json", "value": {"type": "object", "required": ["a"]}}, '{"a": 1}', True),
        ({"type": "numeric", "value": {"expected": 3.14, "tolerance": 0.01}}, "pi is 3.141", True),
        ({"type": "numeric", "value": 42}, "it is 41", False),
        ({"type": "numeric", "value": 42}, "12 + 30 = 42", True),
        ({"type": "python", "value": "output.upper() == 'OK'"}, "ok", True),
        (
            {"type": "similar", "value": "the cat sat on the mat", "method": "bm25"},
            "the cat sat on the mat",
            True,
        ),  # noqa: E501
        (
            {"type": "similar", "value": "the cat sat on the mat", "threshold": 0.5},
            "stocks fell",
            False,
        ),  # noqa: E501
        (
            {"type": "similar", "value": "red apple", "method": "cosine", "threshold": 0.7},
            "apple red",
            True,
        ),  # noqa: E501
    ],
)
def test_assertions(spec: dict, text: str, passed: bool) -> None:
    r = grade(spec, Output(text=text), {"city": "Paris"})
    assert r["passed"] is passed, r


def test_python_file_assertion_and_program_assertions(tmp_path: Path) -> None:
    (tmp_path / "check.py").write_text(
        "def get_assert(output, context):\n"
        "    return {'pass': 'x' in output, 'score': 0.25, 'reason': context['vars']['k']}\n"
        "def length(output, context):\n    return len(output) / 10\n"
    )
    r = grade(
        {"type": "python", "value": "file://check.py"}, Output(text="x"), {"k": "v"}, tmp_path
    )  # noqa: E501
    assert r == {"type": "python", "passed": True, "score": 0.25, "reason": "v", "weight": 1.0}
    r = grade(
        {"type": "python", "value": "file://check.py:length", "threshold": 0.5},
        Output(text="abc"),
        base=tmp_path,
    )  # noqa: E501
    assert not r["passed"] and r["score"] == pytest.approx(0.3)
    out = Output(
        text="done", steps=3, cost=0.002, latency_s=1.5,
        tool_calls=[{"name": "read_file", "arguments": {"path": "a.txt"}}],
    )  # fmt: skip
    assert grade({"type": "tool-called", "value": "read_file"}, out)["passed"]
    spec = {"type": "tool-called", "value": {"name": "read_file", "arguments": {"path": "b.txt"}}}
    assert not grade(spec, out)["passed"]
    assert grade({"type": "not-tool-called", "value": "list_dir"}, out)["passed"]
    assert grade({"type": "max-steps", "value": 3}, out)["passed"]
    assert not grade({"type": "max-steps", "value": 2}, out)["passed"]
    assert not grade({"type": "max-cost", "value": 0.001}, out)["passed"]
    assert grade({"type": "latency", "threshold": 2000}, out)["passed"]  # ms, as promptfoo
    failed = grade({"type": "contains", "value": "x"}, Output(error="boom", status="error"))
    assert not failed["passed"] and "boom" in failed["reason"]


def test_weights_and_test_threshold() -> None:
    results = [
        {"passed": True, "score": 1.0, "weight": 3.0},
        {"passed": False, "score": 0.0, "weight": 1.0},
        {"passed": False, "score": 0.0, "weight": 0.0},  # informational
    ]
    assert assertions.verdict(results, None) == (False, 0.75)
    assert assertions.verdict(results, 0.7) == (True, 0.75)
    assert assertions.verdict(results, 0.8)[0] is False


def test_statistics() -> None:
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == [0.0, 1.0]
    assert wilson(10, 10)[1] == pytest.approx(1.0)
    assert pass_hat_k(3, 3, 3) == 1.0 and pass_hat_k(2, 3, 3) == 0.0
    assert pass_hat_k(3, 4, 2) == pytest.approx(0.5)  # C(3,2)/C(4,2)
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile([1, 2, 3, 4], 0.95) == 4


def result_for(marks: dict[tuple[str, str], list[bool]], run_id: str = "r1") -> dict:
    cases = [
        {"cell": cell, "test": test, "description": test, "repeat": r, "passed": ok,
         "score": float(ok), "output": "out", "latency_s": 0.5 + r, "tokens": 10, "cost": 0.001,
         "assertions": [{"type": "contains", "passed": ok, "score": float(ok), "reason": "why"}]}
        for (cell, test), oks in marks.items() for r, ok in enumerate(oks)
    ]  # fmt: skip
    cells = []
    for cell in dict.fromkeys(c for c, _ in marks):
        mine = [c for c in cases if c["cell"] == cell]
        passed = sum(c["passed"] for c in mine)
        cells.append({
            "id": cell, "label": cell.upper(), "provider": "local:smollm2-135m", "config": {},
            "passed": passed, "total": len(mine), "pass_rate": passed / len(mine),
            "pass_k": None, "k": 2, "wilson": wilson(passed, len(mine)), "prompt_tokens": 5,
            "completion_tokens": 5, "cost": 0.001 * len(mine), "latency_p50": 0.5,
            "latency_p95": 1.5,
        })  # fmt: skip
    return {
        "run_id": run_id, "suite": {"name": "s", "path": "/s.yaml", "hash": "h"},
        "started_at": 1.0, "duration_s": 2.0, "repeat": 2, "cells": cells, "cases": cases,
        "gates": [], "baseline": None,
    }  # fmt: skip


def test_gates_name_what_failed_and_set_the_exit_code() -> None:
    result = result_for({("a", "t1"): [True, True], ("a", "t2"): [True, False]})
    held = gates.check(result, {"pass_rate": 0.5, "max_cost": 1.0, "test_pass_k": {"t1": 1.0}})
    assert all(g["passed"] for g in held) and gates.exit_code(held) == 0
    failed = gates.check(
        result, {"pass_rate": 0.9, "test_pass_k": {"t2": 1.0, "t9": 1}, "max_latency_p95": 1.0}
    )  # noqa: E501
    names = [g["name"] for g in failed if not g["passed"]]
    assert names == [
        "pass_rate [A]",
        "max_latency_p95 [A]",
        "test_pass_k t2 [A]",
        "test_pass_k t9 [A]",
    ]  # noqa: E501
    assert "3/4 = 75.0% (need 90.0%)" in failed[0]["detail"]
    assert gates.exit_code(failed) == 1


def test_history_in_sqlite_and_flips_against_a_baseline(tmp_path: Path) -> None:
    db = tmp_path / "llmos.db"
    h = history.History(db)
    first = result_for({("a", "t1"): [True, True], ("a", "t2"): [False, False]}, "run1")
    h.save(first, seed=7)
    second = result_for({("a", "t1"): [True, False], ("a", "t2"): [True, True]}, "run2")
    second["started_at"] = 2.0
    assert h.resolve("last", "/s.yaml") == "run1"
    second["baseline"] = {"run_id": "run1", "flips": history.flips(second, h.verdicts("run1"))}
    assert second["baseline"]["flips"] == [
        {"cell": "a", "test": "t1", "was": True, "now": False},
        {"cell": "a", "test": "t2", "was": False, "now": True},
    ]
    h.save(second)
    assert h.resolve("last", "/s.yaml", exclude="run2") == "run1"
    assert h.resolve("last", "/s.yaml") == "run2" and h.resolve("nope", "/s.yaml") is None
    h.close()
    con = sqlite3.connect(db)  # the kernel's own file: processes and eval runs side by side
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"processes", "usage", "eval_runs", "eval_cases"} <= tables
    assert con.execute(
        "SELECT seed, suite_hash, repeat FROM eval_runs WHERE run_id='run1'"
    ).fetchone() == (7, "h", 2)  # noqa: E501
    assert con.execute("SELECT COUNT(*) FROM eval_cases").fetchone()[0] == 8


def test_reports(tmp_path: Path) -> None:
    result = result_for({("a", "t1"): [True, True], ("a", "t2"): [True, False]})
    result["gates"] = gates.check(result, {"pass_rate": 0.9})
    result["baseline"] = {
        "run_id": "r0",
        "flips": [{"cell": "a", "test": "t2", "was": True, "now": False}],
    }  # noqa: E501
    paths = report.write(result, tmp_path / "out")
    assert [p.name for p in paths] == ["result.json", "junit.xml", "report.md"]
    assert json.loads(paths[0].read_text()) == result
    root = ET.parse(paths[1]).getroot()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert suites["A"].get("tests") == "4" and suites["A"].get("failures") == "1"
    failure = suites["A"].find("testcase[@name='t2 #1']/failure")
    assert failure is not None and "contains: why" in failure.get("message")
    assert suites["gates"].get("failures") == "1"
    md = paths[2].read_text()
    assert "| A | 3/4 | 75% (" in md and "FAIL pass_rate [A]" in md
    result["cells"][0].update(pass_k=0.5, pass_k_wilson=wilson(1, 2))
    assert "| 50% (9%-91%; k=2) |" in report.to_markdown(result)
    assert "a / t2: pass -> fail" in md


def test_cli_option_errors_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "providers: [local]\ntests: [{}]\n")
    for args, message in [
        (["--html"], "--html writes report.html"),
        (["--baseline", "last", "--no-store"], "cannot go with --no-store"),
        (["--baseline", "nope"], "--baseline: no run 'nope'"),
        (["--repeat", "0"], "--repeat must be at least 1"),
    ]:
        result = CliRunner().invoke(app, ["eval", str(path), "--db", str(tmp_path / "h.db"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_each_cell_gets_its_own_program() -> None:
    from llmos.evals.providers import load_program

    suite = load_suite(Path(__file__).resolve().parents[1] / "evals" / "agent_matrix.yaml")
    programs = [load_program(c) for c in suite.cells]  # all loaded before any runs
    assert [p.typed_args for p in programs] == [True] * 4 + [False] * 4
    assert len({id(p) for p in programs}) == len(programs)


# Every assertion type with an output it passes on: its not- form must fail there, and pass
# on the output it fails on. A new type without an entry here fails the first check.
NEGATABLE: dict[str, tuple[dict, Output, Output]] = {
    "equals": ({"value": "Paris"}, Output(text="Paris"), Output(text="Rome")),
    "contains": ({"value": "Par"}, Output(text="Paris"), Output(text="Rome")),
    "icontains": ({"value": "par"}, Output(text="Paris"), Output(text="Rome")),
    "contains-any": ({"value": ["x", "Par"]}, Output(text="Paris"), Output(text="Rome")),
    "contains-all": ({"value": ["P", "s"]}, Output(text="Paris"), Output(text="Rome")),
    "icontains-any": ({"value": ["x", "par"]}, Output(text="Paris"), Output(text="Rome")),
    "icontains-all": ({"value": ["p", "S"]}, Output(text="Paris"), Output(text="Rome")),
    "regex": ({"value": r"^\d+$"}, Output(text="42"), Output(text="x42")),
    "starts-with": ({"value": "Par"}, Output(text="Paris"), Output(text="Rome")),
    "is-json": ({}, Output(text='{"a": 1}'), Output(text="{a: 1}")),
    "json-schema": (
        {"value": {"type": "object", "required": ["a"]}},
        Output(text='{"a": 1}'),
        Output(text='{"b": 1}'),
    ),
    "numeric": ({"value": {"expected": 4, "tolerance": 0.5}}, Output(text="4.2"), Output("5")),
    "python": ({"value": "len(output) < 3"}, Output(text="ok"), Output(text="too long")),
    "similar": ({"value": "red apple pie"}, Output(text="red apple pie"), Output(text="stocks")),
    "llm-rubric": ({"value": "Says yes."}, Output(text="yes"), Output(text="no")),
    "tool-called": (
        {"value": {"name": "read_file", "arguments": {"path": "a"}}},
        Output(tool_calls=[{"name": "read_file", "arguments": {"path": "a"}}]),
        Output(tool_calls=[{"name": "read_file", "arguments": {"path": "b"}}]),
    ),
    "max-steps": ({"value": 2}, Output(steps=2), Output(steps=3)),
    "max-cost": ({"value": 0.01}, Output(cost=0.01), Output(cost=0.02)),
    "cost": ({"threshold": 0.01}, Output(cost=0.001), Output(cost=0.02)),
    "latency": ({"threshold": 1000}, Output(latency_s=0.5), Output(latency_s=2.0)),
}


def test_not_inverts_every_assertion_type() -> None:
    from llmos.evals.suite import _assertion

    assert set(NEGATABLE) == set(assertions.TYPES)

    async def judge(provider: str, prompt: str) -> str:  # a rubric judge that reads the answer
        return "PASS" if "Answer: yes\n" in prompt else "FAIL"

    for kind, (spec, good, bad) in NEGATABLE.items():
        cases = [(kind, good, True), (kind, bad, False)]
        cases += [(f"not-{kind}", good, False), (f"not-{kind}", bad, True)]
        for name, out, want in cases:
            a = _assertion({"type": name, **spec}, "t")
            r = asyncio.run(assertions.grade(a, out, assertions.Context({}, Path("."), judge)))
            assert r["passed"] is want and r["type"] == name, (name, out, r)
            if name.startswith("not-"):
                assert r["reason"].startswith("not: "), r


def test_every_engine_option_crosses_in_a_matrix(tmp_path: Path) -> None:
    """Every field of the engine's config is a matrix flag (speculative decoding's too, once
    it is one), and each flag set is its own engine; the model and seed are not flags."""
    from dataclasses import fields

    from llmos.engine.config import EngineConfig

    names = {f.name for f in fields(EngineConfig)} - {"model", "seed", "user_weights"}
    assert {"deterministic", "quantization", "kv_cache_dtype"} <= names
    engine = ", ".join(f"{{{n}: {json.dumps(getattr(EngineConfig(), n))}}}" for n in sorted(names))
    suite = load_suite(write(tmp_path, f"providers: [local]\ntests: [{{}}]\n"
                                       f"matrix: {{engine: [{engine}]}}\n"))  # fmt: skip
    assert sorted(next(iter(c.engine)) for c in suite.cells) == sorted(names)
    assert len({c.engine_key for c in suite.cells}) == len(names)
    with pytest.raises(SuiteError, match=r"matrix.engine\[0\]"):
        load_suite(write(tmp_path, "providers: [local]\ntests: [{}]\n"
                                   "matrix: {engine: [{seed: 3}]}\n"))  # fmt: skip
