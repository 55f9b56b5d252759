"""`llmos eval` on the real model: a matrix of a greedy and a seeded sampling cell, repeats,
a schema-constrained JSON case, a multiple-choice case scored by log-likelihood, an
llm-rubric judged by the same local model, the history, a baseline and the gates' exit
codes. Two runs of the CLI, each loading the engine once for all its cells."""

from __future__ import annotations

import json
import sqlite3
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from llmos.cli.main import app

SUITE = """
description: model checks
prompts: ["{{q}}"]
providers:
  - {id: local:smollm2-135m, label: local, config: {max_tokens: 24}}
matrix:
  sampling: [{temperature: 0}, {temperature: 1.0, seed: 5}]
tests:
  - id: capital
    vars: {q: "What is the capital of France? Answer in one word."}
    assert: [{type: icontains, value: paris}, {type: latency, threshold: 600000}]
  - id: json
    vars: {q: "Give a person as JSON with a name and an age."}
    options:
      json_schema: {type: object, properties: {name: {type: string}, age: {type: integer}},
                    required: [name, age], additionalProperties: false}
      max_tokens: 40
    assert: [{type: is-json, value: {type: object, required: [name, age]}}]
  - id: choice
    vars: {q: "The capital of France is"}
    choices: [" Paris", " Berlin", " Madrid"]
    answer: " Paris"
  - id: rubric
    vars: {q: "Say hello."}
    assert: [{type: llm-rubric, value: "The answer is a greeting.", weight: 0}]
gates: {GATES}
"""


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("evals")
    suite, db = tmp / "suite.yaml", tmp / "llmos.db"
    suite.write_text(SUITE.replace("{GATES}", "{pass_rate: 0.5}"))
    first = invoke(["eval", str(suite), "--repeat", "2", "--db", str(db), "--out", str(tmp / "a")])
    suite.write_text(SUITE.replace("{GATES}", "{pass_rate: 0.5, max_cost: 0.0}"))
    second = invoke(
        ["eval", str(suite), "--db", str(db), "--baseline", "last", "--out", str(tmp / "b")]
    )  # noqa: E501
    return {"tmp": tmp, "db": db, "first": first, "second": second}


def test_a_passing_run_exits_0_with_its_reports(runs: dict) -> None:
    code, output = runs["first"]
    assert code == 0, output
    result = json.loads((runs["tmp"] / "a" / "result.json").read_text())
    assert len(result["cells"]) == 2 and len(result["cases"]) == 2 * 4 * 2
    for cell in result["cells"]:
        assert cell["k"] == 2 and cell["pass_k"] is not None
        klo, khi = cell["pass_k_wilson"]  # pass^k's interval, over the 4 tests
        assert klo <= cell["pass_k"] <= khi and khi - klo > 0.2, cell
        assert cell["wilson"][0] <= cell["pass_rate"] <= cell["wilson"][1]
        assert cell["prompt_tokens"] > 0 and cell["completion_tokens"] > 0 and cell["cost"] > 0
        assert 0 < cell["latency_p50"] <= cell["latency_p95"]
    by = {(c["cell"], c["test"], c["repeat"]): c for c in result["cases"]}
    greedy, sampled = (c["id"] for c in result["cells"])
    # greedy: both repeats the same answer; seeded sampling: each repeat a fresh sample
    assert by[(greedy, "capital", 0)]["output"] == by[(greedy, "capital", 1)]["output"]
    assert by[(greedy, "capital", 0)]["passed"], by[(greedy, "capital", 0)]
    fresh = [
        by[(sampled, t, 0)]["output"] != by[(sampled, t, 1)]["output"]
        for t in ("capital", "rubric")
    ]  # noqa: E501
    assert any(fresh), [
        by[(sampled, t, r)]["output"] for t in ("capital", "rubric") for r in (0, 1)
    ]  # noqa: E501
    for cell in (greedy, sampled):  # the grammar makes the JSON schema-valid
        assert by[(cell, "json", 0)]["passed"], by[(cell, "json", 0)]
        assert by[(cell, "choice", 0)]["output"] == " Paris"  # log-likelihood picks Paris
        scores = [t["logprob"] for t in by[(cell, "choice", 0)]["transcript"]]
        assert len(scores) == 3 and scores[0] == max(scores) < 0, scores
    rubric = by[(greedy, "rubric", 0)]["assertions"][0]
    assert rubric["type"] == "llm-rubric" and rubric["reason"].startswith("judge said")
    assert "PASS" in rubric["reason"] or "FAIL" in rubric["reason"]
    # the greedy and sampled cells (and the local judge) share one loaded engine
    assert len(result["engines"]) == 1, result["engines"]
    assert result["engines"] and all(
        e["kv_blocks_used"] == 0 and e["kv_blocks_orphaned"] == 0 for e in result["engines"]
    ), result["engines"]
    junit = ET.parse(runs["tmp"] / "a" / "junit.xml").getroot()
    assert (
        sum(int(s.get("tests")) for s in junit.iter("testsuite") if s.get("name") != "gates") == 16
    )  # noqa: E501


def test_a_failed_gate_exits_1_naming_it_and_lists_flips(runs: dict) -> None:
    code, output = runs["second"]
    assert code == 1, output
    assert "gate failed: max_cost [local temperature=0]" in output
    first = json.loads((runs["tmp"] / "a" / "result.json").read_text())
    second = json.loads((runs["tmp"] / "b" / "result.json").read_text())
    assert second["baseline"]["run_id"] == first["run_id"]

    def verdicts(result: dict) -> dict:
        out: dict = {}
        for c in result["cases"]:
            out[(c["cell"], c["test"])] = out.get((c["cell"], c["test"]), True) and c["passed"]
        return out

    was, now = verdicts(first), verdicts(second)
    expected = sorted(k for k in now if was[k] != now[k])
    assert sorted((f["cell"], f["test"]) for f in second["baseline"]["flips"]) == expected
    # greedy verdicts hold from run to run
    greedy = first["cells"][0]["id"]
    assert all(was[k] == now[k] for k in now if k[0] == greedy)


def test_every_run_is_in_the_kernel_sqlite(runs: dict) -> None:
    con = sqlite3.connect(runs["db"])
    rows = con.execute(
        "SELECT run_id, repeat, passed, cells FROM eval_runs ORDER BY started_at"
    ).fetchall()  # noqa: E501
    assert [(r[1], r[2]) for r in rows] == [(2, 1), (1, 0)]
    cells = json.loads(rows[0][3])
    assert cells[0]["model_hash"] and cells[0]["config"]["temperature"] == 0
    assert cells[1]["config"]["seed"] == 5 and cells[0]["engine"]["kv_cache_memory"]
    n = con.execute("SELECT COUNT(*) FROM eval_cases WHERE run_id = ?", (rows[0][0],)).fetchone()
    assert n == (16,)
