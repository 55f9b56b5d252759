"""Property tests of `memory.compact` over thousands of random transcripts: the pinned head
(system prompt, task) is never dropped, no tool message loses its call nor a call its result,
the result always fits (or ContextOverflow says why it cannot), and a compaction's next turn
keeps the prompt's front byte-identical."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmos.kernel.memory import ContextOverflow, Counter, compact, elided, units
from llmos.kernel.memory_config import MemoryConfig

Message = dict[str, Any]


def words(msgs: list[Message], _tools: Any = None) -> int:
    return sum(len(str(m.get("content") or "").split()) + 3 for m in msgs)


def text(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@st.composite
def transcripts(draw: Any) -> list[Message]:
    msgs: list[Message] = [
        {"role": "system", "content": text(draw(st.integers(1, 40)))},
        {"role": "user", "content": "task " + text(draw(st.integers(0, 30)))},
    ]
    for u in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(["calls", "calls", "say", "user"]))
        if kind == "calls":
            k = draw(st.integers(1, 3))
            ids = [f"c{u}_{j}" for j in range(k)]
            fn = {"name": "f", "arguments": "{}"}
            calls = [{"id": i, "type": "function", "function": fn} for i in ids]
            msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
            for i in ids:
                n = draw(st.integers(0, 400))
                msgs.append({"role": "tool", "tool_call_id": i, "content": text(n)})
        else:
            role = "assistant" if kind == "say" else "user"
            msgs.append({"role": role, "content": text(draw(st.integers(1, 200)))})
    return msgs


def paired(msgs: list[Message]) -> bool:
    """Every tool message follows the assistant that called it; every call has its result."""
    open_calls: set[str] = set()
    for m in msgs:
        if m["role"] == "tool":
            if m["tool_call_id"] not in open_calls:
                return False
            open_calls.discard(m["tool_call_id"])
        else:
            if open_calls:
                return False  # a call left without its result
            open_calls = {c["id"] for c in m.get("tool_calls", [])}
    return not open_calls


def minimal(msgs: list[Message]) -> int:
    """The least any compaction could keep: head, a note, the newest unit elided."""
    body = msgs[2:]
    if not body:
        return words(msgs[:2])
    last = body[units(body)[-1] :]
    small = [elided(m) if m["role"] == "tool" else m for m in last]
    return words(msgs[:2]) + 15 + words(small)


CFGS = st.builds(
    MemoryConfig,
    policy=st.sampled_from(["trim", "page"]),
    keep_recent=st.integers(0, 6),
    low_water=st.floats(0.3, 1.0),
)


def check(msgs: list[Message], limit: int, cfg: MemoryConfig) -> None:
    assert paired(msgs)
    before = [dict(m) for m in msgs]
    try:
        out, c = compact(msgs, Counter(words), limit, cfg)
    except ContextOverflow:
        assert minimal(msgs) > limit * 0.9  # refused only when even the least cannot fit
        return
    assert msgs == before  # the transcript itself is never changed
    assert out[0] == msgs[0] and out[1] == msgs[1]  # the system prompt and the task stay
    assert words(out) <= limit  # it always fits
    assert paired(out)  # no orphan tool message, no call without its result
    if c is None:
        assert out is msgs and words(msgs) <= limit
    else:
        assert c.tokens_after == words(out) and c.tokens_before >= c.tokens_after
        assert out[-1]["role"] == msgs[-1]["role"] or len(msgs) == 2  # the newest stays


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transcripts(), st.integers(20, 3000), CFGS)
def test_invariants_over_random_transcripts(
    msgs: list[Message], limit: int, cfg: MemoryConfig
) -> None:
    check(msgs, limit, cfg)


def random_transcript(rng: random.Random) -> list[Message]:
    msgs: list[Message] = [
        {"role": "system", "content": text(rng.randint(1, 40))},
        {"role": "user", "content": "task " + text(rng.randint(0, 30))},
    ]
    for u in range(rng.randint(0, 40)):
        kind = rng.choice(["calls", "calls", "say", "user"])
        if kind == "calls":
            ids = [f"c{u}_{j}" for j in range(rng.randint(1, 3))]
            fn = {"name": "f", "arguments": "{}"}
            calls = [{"id": i, "type": "function", "function": fn} for i in ids]
            msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
            msgs += [
                {"role": "tool", "tool_call_id": i, "content": text(rng.randint(0, 400))}
                for i in ids
            ]
        else:
            role = "assistant" if kind == "say" else "user"
            msgs.append({"role": role, "content": text(rng.randint(1, 200))})
    return msgs


def test_invariants_over_3000_seeded_transcripts() -> None:
    """Thousands more, from a seeded generator (hypothesis above shrinks a failure)."""
    rng = random.Random(18)
    for _ in range(3000):
        cfg = MemoryConfig(
            policy=rng.choice(["trim", "page"]),
            keep_recent=rng.randint(0, 6),
            low_water=rng.uniform(0.3, 1.0),
        )
        check(random_transcript(rng), rng.randint(20, 3000), cfg)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transcripts(), st.integers(300, 3000), st.integers(1, 8))
def test_the_turn_after_a_compaction_keeps_the_front(
    msgs: list[Message], limit: int, grow: int
) -> None:
    """Grow a conversation a unit at a time, fitting each turn with the last compaction as
    `prior`: a turn that reuses it sends the previous prompt plus new messages only."""
    cfg = MemoryConfig(low_water=0.6)
    counter = Counter(words)
    prior, prev = None, None
    body = msgs[2:]
    starts = units(body) + [len(body)]
    for end in starts[1:]:
        convo = msgs[:2] + body[:end]
        try:
            out, c = compact(convo, counter, limit, cfg, prior=prior)
        except ContextOverflow:
            return
        assert words(out) <= limit and paired(out) and out[:2] == msgs[:2]
        if c is not None and c.reused and prev is not None:
            assert out[: len(prev)] == prev  # byte-identical front: the prefix cache hits
        prior, prev = (c or prior), out
