"""Pinned conversations: a finished request's blocks kept under a key for its next turn."""

from __future__ import annotations

import pytest

from llmos import LLM, SamplingParams
from llmos.errors import RequestError

BS = 16
TURN = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def run(llm: LLM, rid: str, prompt: list[int], **kw: object):
    llm.engine.add_request(rid, prompt, TURN, **kw)
    done = None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished and out.request_id == rid:
                done = out
    assert done is not None
    return done


def conversation(llm: LLM, topic: str) -> list[int]:
    facts = " ".join(f"Fact {i} about {topic} is {i * 3}." for i in range(40))
    return llm.tokenizer.encode(f"Notes on {topic}. {facts}")


@pytest.fixture(scope="module")
def small() -> LLM:
    """40 blocks of 16 tokens: one 300-token conversation plus a little room."""
    return LLM(num_kv_blocks=40)


def flood(llm: LLM) -> None:
    """Traffic that needs every unpinned block, so the LRU prefix cache forgets the rest."""
    for i in range(3):
        run(llm, f"flood{i}", conversation(llm, f"topic {i}")[:300])


@pytest.mark.parametrize("retain", [None, "p1"])
def test_pinned_turn_survives_other_traffic(small: LLM, retain: str | None) -> None:
    small.engine.blocks.reset_prefix_cache()
    first = conversation(small, "the kernel")[:250]
    out = run(small, "t1", first, retain=retain)
    history = first + out.outputs[0].token_ids
    stats = small.engine.stats()
    named = (len(history) - 1) // BS  # the last sampled token has no K/V yet
    assert stats.kv_blocks_pinned == (named if retain else 0)
    assert stats.kv_blocks_used == stats.kv_blocks_pinned
    flood(small)
    nxt = run(small, "t2", history + small.tokenizer.encode(" And what next?"))
    if retain:
        assert nxt.num_cached_tokens == named * BS  # only the new turn is prefilled
    else:
        assert nxt.num_cached_tokens == 0
    assert small.engine.release("p1") is bool(retain)
    assert small.engine.stats().kv_blocks_used == 0


def test_memory_pressure_releases_the_oldest_pin_before_preempting(small: LLM) -> None:
    engine = small.engine
    run(small, "a", conversation(small, "alpha")[:200], retain="pa")
    run(small, "b", conversation(small, "beta")[:200], retain="pb")
    assert engine.stats().num_pins == 2
    preemptions = engine.stats().num_preemptions
    run(small, "big", conversation(small, "gamma")[:320])  # needs pa's blocks, not pb's
    stats = engine.stats()
    assert stats.num_preemptions == preemptions
    assert stats.num_pins == 1
    assert not engine.release("pa") and engine.release("pb")
    assert engine.stats().kv_blocks_used == 0


def test_next_turn_replaces_the_pin_and_abort_pins_nothing(llm: LLM) -> None:
    engine = llm.engine
    first = conversation(llm, "pins")[:120]
    out = run(llm, "r1", first, retain="proc")
    history = first + out.outputs[0].token_ids + llm.tokenizer.encode(" More, please.")
    out2 = run(llm, "r2", history, retain="proc")
    assert engine.stats().num_pins == 1
    total = len(history) + len(out2.outputs[0].token_ids)
    assert engine.stats().kv_blocks_pinned == (total - 1) // BS
    assert engine.release("proc") and not engine.release("proc")

    engine.add_request("gone", first, TURN, retain="aborted")
    engine.step()
    engine.abort_request("gone")
    assert engine.stats().num_pins == 0 and engine.blocks.num_used == 0


def test_retain_must_be_a_key(llm: LLM) -> None:
    with pytest.raises(RequestError) as err:
        llm.engine.add_request("bad", [1, 2, 3], TURN, retain="")
    assert err.value.param == "retain"
