"""The cascade (llmos/kernel/router.py): small first, check, escalate. The escalation logic
runs on scripted tiers through the real kernel (SQLite rows, meter, sandbox); one test puts the
real local model in as the small tier, with its real log-probabilities."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.backends.base import ChatRequest, ChatResult
from llmos.backends.scripted import ScriptedBackend, call
from llmos.kernel import Kernel, Program, Status
from llmos.kernel.meter import Price
from llmos.kernel.process import ErrorStep, FinalAnswer, ModelTurn
from llmos.kernel.program import ProgramError
from llmos.kernel.router import (
    Cascade,
    CascadeConfig,
    CascadeError,
    CascadeResult,
    resolve,
    split_spec,
)

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
PRICES = {"small": Price(completion_per_mtok=1_000.0), "big": Price(completion_per_mtok=50_000.0)}


class Tier(ScriptedBackend):
    """A scripted tier whose turn is a function of the request; it keeps what it was asked
    and may return log-probabilities."""

    def __init__(self, name: str, turn: Callable[[ChatRequest], dict[str, Any]]) -> None:
        super().__init__(turn, name=name)

    async def chat(self, request: ChatRequest) -> ChatResult:
        result = await super().chat(request)
        result.logprobs = self.turns(request).get("logprobs")  # type: ignore[operator]
        return result


def says(text: str, **extra: Any) -> Callable[[ChatRequest], dict[str, Any]]:
    return lambda request: {"content": text, **extra}


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(db=tmp_path / "k.db", prices=PRICES) as k:
        yield k


def spawn(kernel: Kernel, backend: Cascade, tmp_path: Path, **program: Any):
    kernel.backend = backend
    pid = kernel.spawn(Program(**program), "Give n.", workspace=tmp_path)
    return kernel.wait(pid, 30)


def usage(kernel: Kernel, pid: int) -> list[tuple[Any, ...]]:
    sql = "SELECT seq, model, completion_tokens, cost FROM usage WHERE pid = ? ORDER BY seq"
    return [tuple(r) for r in kernel.store.query(sql, (pid,))]


def test_schema_failure_escalates_with_the_attempt_and_reason(
    kernel: Kernel, tmp_path: Path
) -> None:
    small, big = Tier("small", says("n is 4")), Tier("big", says('{"n": 4}'))
    p = spawn(kernel, Cascade([small, big]), tmp_path, output_schema=SCHEMA)
    assert p.status is Status.DONE and json.loads(p.answer) == {"n": 4}
    kinds = [s.kind for s in p.steps]
    assert kinds == ["model_turn", "error", "model_turn", "final_answer"]
    rejected, why, accepted = p.steps[0], p.steps[1], p.steps[2]
    assert isinstance(rejected, ModelTurn) and rejected.backend == "small"
    assert rejected.content == "n is 4" and "rejected by the cascade" in (rejected.malformed or "")
    assert isinstance(why, ErrorStep) and why.what == "bad_answer" and "not JSON" in why.message
    assert isinstance(accepted, ModelTurn) and accepted.backend == "big"
    assert accepted.malformed is None
    # the big tier saw the failed attempt and the reason
    (asked,) = big.requests
    assert asked.messages[-2]["role"] == "assistant" and asked.messages[-2]["content"] == "n is 4"
    assert "not JSON" in asked.messages[-1]["content"]
    assert len(small.requests) == 1
    # each attempt is metered to its own backend at its own price
    rows = usage(kernel, p.pid)
    assert [(r[0], r[1], r[2]) for r in rows] == [(0, "small", 10), (2, "big", 10)]
    assert rows[0][3] == pytest.approx(10 * 1_000.0 / 1e6)
    assert rows[1][3] == pytest.approx(10 * 50_000.0 / 1e6)
    assert p.usage.cost == pytest.approx(rows[0][3] + rows[1][3])


def test_no_feedback_asks_the_next_tier_the_original_question(
    kernel: Kernel, tmp_path: Path
) -> None:
    small, big = Tier("small", says("nope")), Tier("big", says('{"n": 1}'))
    cascade = Cascade([small, big])
    p = spawn(kernel, cascade, tmp_path, output_schema=SCHEMA, cascade={"feedback": False})
    assert p.status is Status.DONE
    assert big.requests[0].messages == small.requests[0].messages


def test_a_passing_small_answer_never_reaches_the_big_tier(kernel: Kernel, tmp_path: Path) -> None:
    small, big = Tier("small", says('{"n": 2}')), Tier("big", says('{"n": 3}'))
    p = spawn(kernel, Cascade([small, big]), tmp_path, output_schema=SCHEMA)
    assert p.answer == '{"n": 2}' and not big.requests
    assert [r[1] for r in usage(kernel, p.pid)] == ["small"]


def test_bad_tool_arguments_escalate(kernel: Kernel, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("n = 7\n")

    def small_turn(request: ChatRequest) -> dict[str, Any]:
        if any(m["role"] == "tool" for m in request.messages):
            return {"content": "7"}
        return {"tool_calls": [call("read_file", path=12)]}  # not a string

    def big_turn(request: ChatRequest) -> dict[str, Any]:
        return {"tool_calls": [call("read_file", path="a.txt")]}

    small, big = Tier("small", small_turn), Tier("big", big_turn)
    p = spawn(kernel, Cascade([small, big]), tmp_path, tools=["read_file"], typed_args=False)
    assert p.status is Status.DONE and p.answer == "7"
    why = p.steps[1]
    assert isinstance(why, ErrorStep) and "read_file" in why.message and "schema" in why.message
    turns = [s for s in p.steps if isinstance(s, ModelTurn)]
    assert [t.backend for t in turns] == ["small", "big", "small"]  # next step: small again
    assert p.steps[3].kind == "tool_call"


def test_samples_retry_the_same_tier_with_new_seeds(kernel: Kernel, tmp_path: Path) -> None:
    def small_turn(request: ChatRequest) -> dict[str, Any]:
        seed = request.sampling.get("seed")
        return {"content": '{"n": 5}' if seed == 2 else f"seed {seed}"}

    small, big = Tier("small", small_turn), Tier("big", says('{"n": 9}'))
    cascade = Cascade([small, big])
    program = {"output_schema": SCHEMA, "cascade": {"samples": 3, "feedback": False}}
    p = spawn(kernel, cascade, tmp_path, **program)
    assert p.answer == '{"n": 5}' and not big.requests
    assert [r.sampling.get("seed") for r in small.requests] == [None, 1, 2]
    # a greedy program's re-samples get the sampling temperature, else they would repeat
    assert [r.sampling.get("temperature") for r in small.requests] == [None, 0.7, 0.7]
    assert [r[1] for r in usage(kernel, p.pid)] == ["small", "small", "small"]
    # one sample per tier from a list: the big tier asked once after three small tries
    small.requests.clear()
    small.turns = says("never")
    program = {"output_schema": SCHEMA, "cascade": {"samples": [3, 1], "feedback": False}}
    p = spawn(kernel, cascade, tmp_path, **program)
    assert p.answer == '{"n": 9}' and len(small.requests) == 3 and len(big.requests) == 1


def test_low_confidence_escalates(kernel: Kernel, tmp_path: Path) -> None:
    unsure = says("maybe 3", logprobs=[math.log(0.9), math.log(0.2)])
    sure = says("3", logprobs=[math.log(0.95)])
    small, big = Tier("small", unsure), Tier("big", sure)
    p = spawn(kernel, Cascade([small, big]), tmp_path, cascade={"min_confidence": 0.6})
    assert p.answer == "3"
    why = p.steps[1]
    assert isinstance(why, ErrorStep) and "0.424" in why.message  # sqrt(0.9 * 0.2)


def test_judge_rejects_then_accepts(kernel: Kernel, tmp_path: Path) -> None:
    def verdict(request: ChatRequest) -> dict[str, Any]:
        return {"content": "yes" if "Answer:\nParis" in request.messages[-1]["content"] else "no"}

    judge = Tier("judge", verdict)
    small, mid, big = (
        Tier("small", says("Lyon")),
        Tier("mid", says("Paris")),
        Tier("big", says("?")),
    )
    cascade = Cascade([small, mid, big], CascadeConfig(judge="judge"), judge)
    p = spawn(kernel, cascade, tmp_path, cascade={"judge": "judge"})
    # the judge rejects the small answer and passes the middle one: the big tier is not asked
    assert p.answer == "Paris" and len(judge.requests) == 2 and not big.requests
    assert "Give n." in judge.requests[0].messages[0]["content"]
    kinds = [s.kind for s in p.steps]
    assert kinds == ["judge", "judge", "model_turn", "error", "model_turn", "final_answer"]
    assert "judge rated the answer 0.00" in p.steps[3].message
    # each judge call is metered to the process, its user and the judge's own model
    rows = usage(kernel, p.pid)
    assert [r[1] for r in rows] == ["judge", "judge", "small", "mid"]
    assert rows[0][2] == 10 and p.usage.completion_tokens == 4 * 10
    log = subprocess.run(
        [
            str(Path(sys.executable).parent / "llmos"),
            "logs",
            str(p.pid),
            "--db",
            str(tmp_path / "k.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert log.returncode == 0 and "judge judge: 'no'" in log.stdout, log.stderr


def test_python_check_in_the_program_file_and_tiers_by_name(kernel: Kernel, tmp_path: Path) -> None:
    (tmp_path / "small.json").write_text(json.dumps([{"content": "41"}]))
    # with feedback the big tier sees one assistant message: its script's turn 1
    (tmp_path / "big.json").write_text(json.dumps([{"content": "0"}, {"content": "42"}]))
    src = tmp_path / "prog.py"
    src.write_text(
        "from llmos import Program\n"
        f"program = Program(model='cascade:[scripted:{tmp_path}/small.json, "
        f"scripted:{tmp_path}/big.json]', cascade={{'python': 'even'}})\n"
        "def even(answer, tool_calls, messages):\n"
        "    return int(answer) % 2 == 0 or f'{answer} is odd'\n"
    )
    pid = kernel.spawn(src, "An even number?", workspace=tmp_path)
    p = kernel.wait(pid, 30)
    assert p.status is Status.DONE and p.answer == "42"
    assert p.steps[1].message == "the python check even: 41 is odd"
    assert [r[1] for r in usage(kernel, pid)] == ["scripted:small.json", "scripted:big.json"]


def test_a_command_checks_the_answer_in_the_sandbox(kernel: Kernel, tmp_path: Path) -> None:
    (tmp_path / "check.py").write_text(
        "import sys\nsys.exit(0 if sys.argv[1] == open('want.txt').read().strip() else 3)\n"
    )
    (tmp_path / "want.txt").write_text("17\n")
    small, big = Tier("small", says("16")), Tier("big", says("17"))
    program = {"cascade": {"command": ["python3", "check.py", "{answer}"]}}
    p = spawn(kernel, Cascade([small, big]), tmp_path, **program)
    assert p.answer == "17"
    assert "exit code 3" in p.steps[1].message


def test_when_every_tier_fails_the_last_answer_meets_the_loop(
    kernel: Kernel, tmp_path: Path
) -> None:
    small, big = Tier("small", says("x")), Tier("big", says("y"))
    p = spawn(kernel, Cascade([small, big]), tmp_path, output_schema=SCHEMA)
    # both tiers failed: the big tier's answer meets the loop's own schema check, after a
    # rejected attempt: unusable twice in a row, a give-up report
    assert p.status is Status.FAILED and p.report is not None
    assert len(small.requests) == 1 and len(big.requests) == 1
    turns = [s for s in p.steps if isinstance(s, ModelTurn)]
    assert [t.backend for t in turns] == ["small", "big"]
    assert not any(isinstance(s, FinalAnswer) for s in p.steps)


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ProgramError, match=r"cascade: unknown field\(s\) \['sampels'\]"):
        Program(cascade={"sampels": 2})
    with pytest.raises(ProgramError, match="cascade.samples must be an integer >= 1"):
        Program(cascade={"samples": 0})
    with pytest.raises(ProgramError, match="cascade.samples must be an integer >= 1"):
        Program(cascade={"samples": [3, "1"]})
    with pytest.raises(ProgramError, match="cascade.min_confidence must be in"):
        Program(cascade={"min_confidence": 2})
    with pytest.raises(ProgramError, match="cascade.command must be a list of strings"):
        Program(cascade={"command": "pytest -q"})
    with pytest.raises(CascadeError, match="cascade:\\[TIER, TIER"):
        resolve("cascade:local")
    with pytest.raises(CascadeError, match="empty tier"):
        resolve("cascade:[scripted:a.json, ]")
    assert split_spec("[a, pool:[b, c@http://h:1/v1], d]") == [
        "a",
        "pool:[b, c@http://h:1/v1]",
        "d",
    ]
    (tmp_path / "t.json").write_text("[]")
    c = resolve(f"cascade:[scripted:{tmp_path}/t.json, scripted:{tmp_path}/t.json]")
    assert isinstance(c, Cascade) and c.name == "cascade:[scripted:t.json, scripted:t.json]"


def test_the_real_local_model_as_the_small_tier(llm: Any) -> None:
    """SmolLM2 answers first with its real log-probabilities; a scripted oracle is the big
    tier; escalation happens only when the confidence check fails."""
    from llmos.backends.local import LocalBackend
    from llmos.kernel.router import Checks

    big = Tier("big", says("391"))
    request = ChatRequest(
        [{"role": "user", "content": "What is 17 times 23? Reply with only the number."}],
        sampling={"max_tokens": 8, "temperature": 0.0},
    )

    async def go() -> tuple[CascadeResult, CascadeResult, float]:
        local = LocalBackend(llm.engine)
        cascade = Cascade([local, big], owns=False)
        try:
            low = await cascade.run(request, Checks(CascadeConfig(min_confidence=0.01)))
            high = await cascade.run(request, Checks(CascadeConfig(min_confidence=0.999999)))
            # the real model as a judge: yes/no under a grammar, its probability the score
            score = await cascade._judge(local, low, request)
            return low, high, score
        finally:
            await local.aclose()

    low, high, score = asyncio.run(go())
    # confident enough: the local answer stands, with a log-prob per completion token
    assert low.backend == "local:smollm2-135m" and not low.attempts
    assert low.logprobs is not None and len(low.logprobs) == low.usage.completion_tokens
    assert all(lp <= 0.0 for lp in low.logprobs)
    # a bar no 135M model clears: escalated, the local attempt kept to be metered on its own
    assert high.backend == "big" and high.content == "391" and len(big.requests) == 1
    (attempt,) = high.attempts
    assert attempt.result.backend == "local:smollm2-135m" and "low confidence" in attempt.reason
    assert attempt.result.content == low.content and attempt.result.usage.completion_tokens > 0
    assert 0.0 <= score <= 1.0


def test_llmos_run_a_yaml_cascade_then_logs_and_usage(tmp_path: Path) -> None:
    """`model: cascade:[...]` in a YAML program through the real CLI, rows in SQLite."""
    import os
    import sqlite3
    import subprocess
    import sys

    (tmp_path / "small.json").write_text(json.dumps([{"content": "n is 3"}]))
    (tmp_path / "big.json").write_text(json.dumps([{"content": "?"}, {"content": '{"n": 3}'}]))
    (tmp_path / "prog.yaml").write_text(
        f"name: counter\nmodel: cascade:[scripted:{tmp_path}/small.json, "
        f"scripted:{tmp_path}/big.json]\noutput_schema: {json.dumps(SCHEMA)}\n"
        "cascade: {samples: 1, feedback: true}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_BACKEND"}
    env.update(LLMOS_DB=str(tmp_path / "k.db"), OMP_NUM_THREADS="1", COLUMNS="200")
    llmos = str(Path(sys.executable).parent / "llmos")

    def cli(*args: str) -> str:
        r = subprocess.run(
            [llmos, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert json.loads(cli("run", "prog.yaml", "--input", "Give n.")) == {"n": 3}
    with sqlite3.connect(env["LLMOS_DB"]) as db:
        models = [r[0] for r in db.execute("SELECT model FROM usage ORDER BY seq")]
    assert models == ["scripted:small.json", "scripted:big.json"]
    logs = cli("logs", "1")
    assert "via scripted:small.json\n  unusable output: n is 3" in logs
    assert "bad_answer: the answer is not JSON" in logs and "via scripted:big.json" in logs
    usage = cli("usage")
    assert "scripted:small.json" in usage and "scripted:big.json" in usage
