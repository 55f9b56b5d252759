"""Memory policies in the kernel, on a scripted model with a small window: each call that had
to fit is a `memory` step (shown by `llmos logs`), the summarizer's calls are metered to the
process and bounded, `page` keeps what left the window searchable and edits core memory, and
a prompt that cannot fit stops the process with a report instead of a silent cut."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.backends.base import ChatRequest
from llmos.backends.scripted import ScriptedBackend, call
from llmos.cli.kernel_view import step_lines
from llmos.kernel import Kernel, Program, ProgramError, Status
from llmos.kernel.memory import Compaction, SummaryTurn
from llmos.kernel.memory_policies import SUMMARIZER, SUMMARY_NOTE
from llmos.kernel.process import ToolResultStep

WINDOW, MAX_TOKENS = 420, 40
ROOM = WINDOW - MAX_TOKENS - 8


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    for i in range(8):
        (d / f"f{i}.txt").write_text(f"file {i} says the code is K{i}{i}. " + "filler " * 60)
    return d


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(db=tmp_path / "k.db") as k:
        yield k


def scripted(turns: list[dict[str, Any]], summary: str = "SUMMARY: K00 K11") -> ScriptedBackend:
    """Plays `turns` in order (compaction changes how many assistant messages a prompt has, so
    the script counts calls); a summarizer request gets `summary`."""
    played = {"n": 0}

    def turn(request: ChatRequest) -> dict[str, Any]:
        if request.messages[0]["content"] == SUMMARIZER:
            return {"content": summary}
        played["n"] += 1
        return turns[min(played["n"], len(turns)) - 1]

    backend = ScriptedBackend(turn)
    backend.context_window = WINDOW
    return backend


def run(kernel: Kernel, backend: ScriptedBackend, ws: Path, task: str, **program: Any):
    kernel.backend = backend
    prog = Program(**{"tools": ["read_file"], "sampling": {"max_tokens": MAX_TOKENS}, **program})
    pid = kernel.spawn(prog, task, workspace=ws)
    return kernel.wait(pid, 60)


READS = [{"tool_calls": [call("read_file", path=f"f{i}.txt")]} for i in range(8)]


def compactions(proc: Any) -> list[Compaction]:
    return [s for s in proc.steps if isinstance(s, Compaction)]


def test_trim_records_each_fit_and_keeps_the_front(kernel: Kernel, ws: Path) -> None:
    backend = scripted([*READS, {"content": "done"}])
    p = run(kernel, backend, ws, "Read every file.", memory="trim")
    assert p.status is Status.DONE
    for r in backend.requests:  # every call fit, with the system prompt and the task
        assert backend.count_tokens(r.messages, r.tools) <= ROOM
        assert r.messages[0]["role"] == "system" and r.messages[1]["content"] == "Read every file."
    cs = compactions(p)
    assert cs and all(c.tokens_after <= ROOM < c.tokens_before for c in cs)
    assert any(c.cut for c in cs) and any(c.elided for c in cs)
    assert any(c.reused for c in cs)  # a later turn kept the last compaction
    line = step_lines(cs[-1], 5)[0]
    assert "memory" in line and "→" in line and f"room {ROOM}" in line
    rows = kernel.store.query(
        "SELECT COUNT(*) FROM steps WHERE pid = ? AND kind = 'memory'", (p.pid,)
    )
    assert rows[0][0] == len(cs)


def test_reused_compaction_sends_the_previous_prompt_as_a_prefix(kernel: Kernel, ws: Path) -> None:
    backend = scripted([*READS, {"content": "done"}])
    p = run(kernel, backend, ws, "Read every file.", memory={"policy": "trim", "low_water": 0.5})
    cs = [s for s in p.steps if isinstance(s, Compaction)]
    assert any(c.reused for c in cs)
    pairs = list(zip(backend.requests, backend.requests[1:], strict=False))
    kept = [b for a, b in pairs if b.messages[: len(a.messages)] == a.messages]
    assert len(kept) >= 2  # turns after a compaction append to the prompt unchanged


def test_summarize_is_metered_and_bounded(kernel: Kernel, ws: Path) -> None:
    backend = scripted([*READS, {"content": "done"}])
    p = run(kernel, backend, ws, "Read every file.", memory={"policy": "summarize"})
    assert p.status is Status.DONE
    summaries = [s for s in p.steps if isinstance(s, SummaryTurn)]
    assert summaries and all(s.content == "SUMMARY: K00 K11" for s in summaries)
    asks = [r for r in backend.requests if r.messages[0]["content"] == SUMMARIZER]
    assert all(backend.count_tokens(r.messages, []) <= WINDOW - 200 for r in asks)
    assert all(r.sampling["max_tokens"] == 200 for r in asks)  # the summary is bounded too
    seqs = [i for i, s in enumerate(p.steps) if isinstance(s, SummaryTurn)]
    metered = kernel.store.query(
        f"SELECT seq FROM usage WHERE pid = ? AND seq IN ({','.join('?' * len(seqs))})",
        (p.pid, *seqs),
    )
    assert len(metered) == len(seqs)  # each summarizer call has its usage row
    turns = sum(s.completion_tokens for s in p.steps if s.kind == "model_turn")
    assert p.usage.completion_tokens == turns + 10 * len(seqs)  # summaries count
    assert p.num_turns == 9  # the summarizer's calls are not the program's turns
    later = [r for r in backend.requests if r.messages[0]["content"] != SUMMARIZER]
    notes = [m["content"] for r in later for m in r.messages if m["role"] == "user"]
    assert any(n.startswith(SUMMARY_NOTE) and "K00" in n for n in notes)
    assert any(c.summarized and c.summary_completion_tokens for c in compactions(p))


def test_page_core_memory_recall_and_archive(kernel: Kernel, ws: Path) -> None:
    turns = [
        {"tool_calls": [call("memory_set", block="user", text="likes tea")]},
        {"tool_calls": [call("archive_insert", text="the vault opens with 7781")]},
        *READS,
        {"tool_calls": [call("recall_search", query="K00 code")]},
        {"tool_calls": [call("archive_search", query="vault")]},
        {"tool_calls": [call("memory_append", block="user", text="x" * 3000)]},
        {"content": "done"},
    ]
    backend = scripted(turns)
    p = run(
        kernel,
        backend,
        ws,
        "Which file says the code is K00?",
        memory={"policy": "page", "core": {"persona": "a careful reader"}},
        limits={"max_steps": 20},
    )
    assert p.status is Status.DONE
    last = backend.requests[-1]
    assert "<persona>\na careful reader\n</persona>" in last.messages[0]["content"]
    assert "<user>\nlikes tea\n</user>" in last.messages[0]["content"]  # pinned at the front
    assert {"memory_set", "recall_search"} <= {t["function"]["name"] for t in last.tools}
    results = {s.name: s for s in p.steps if isinstance(s, ToolResultStep)}
    assert "file 0 says the code is K00" in results["recall_search"].output
    assert "7781" in results["archive_search"].output
    bad = results["memory_append"]  # over the block's limit: refused, naming the limit
    assert not bad.ok and "over its limit of 2000" in (bad.error or "")
    cs = compactions(p)
    assert any(c.paged_in for c in cs)  # recall hits for the task, paged in at the end
    assert any("recall memory" in c.note for c in cs if c.cut)


def test_overflow_is_a_memory_event_with_a_report(kernel: Kernel, ws: Path) -> None:
    p = run(kernel, scripted([{"content": "never"}]), ws, "word " * 1000, memory="page")
    assert p.status is Status.FAILED and p.reason.startswith("context window")
    over = [c for c in compactions(p) if c.overflow]
    assert over and "cannot fit" in over[0].overflow
    assert p.report is not None and "context" in str(p.report)
    assert "overflow" in step_lines(over[0], 0)[0]


def test_memory_field_is_checked_and_loads_from_yaml(tmp_path: Path) -> None:
    with pytest.raises(ProgramError, match="memory.policy"):
        Program(memory={"policy": "forget"})
    with pytest.raises(ProgramError, match=r"unknown field\(s\) \['size'\]"):
        Program(memory={"size": 3})
    f = tmp_path / "p.yaml"
    f.write_text("name: pager\nmemory:\n  policy: page\n  core:\n    user: likes tea\n")
    cfg = Program.load(f).memory_config
    assert cfg.policy == "page" and cfg.core == {"user": "likes tea"}


def test_a_remote_backend_s_counts_are_labelled_estimates() -> None:
    from llmos.backends.openai_http import OpenAIHTTPBackend
    from llmos.cli.kernel_view import memory_line
    from llmos.kernel.memory import compact
    from llmos.kernel.memory_policies import counter_for

    remote = OpenAIHTTPBackend("http://127.0.0.1:9/v1", "m", context_window=200)
    counter = counter_for(remote, [])
    assert counter.estimate and not counter_for(scripted([]), []).estimate
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "t"}]
    msgs += [{"role": "user", "content": "word " * 100} for _ in range(6)]
    out, c = compact(msgs, counter, 200)
    assert c is not None and c.estimate and "(estimated)" in memory_line(c)
