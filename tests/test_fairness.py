"""Priorities and weighted fair queuing between users, on the real engine."""

from __future__ import annotations

from llmos import LLM, SamplingParams


def drive(llm: LLM, on_step=None) -> list[str]:  # noqa: ANN001
    """Run the engine to the end; return request ids in finishing order."""
    finished: list[str] = []
    engine = llm.engine
    while engine.has_unfinished_requests():
        outs = engine.step()
        if on_step is not None:
            on_step()
        finished += [o.request_id for o in outs if o.finished]
    return finished


def test_a_flood_from_one_user_does_not_starve_another() -> None:
    llm = LLM(max_num_seqs=4, kv_cache_memory="128MiB")
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i in range(64):
        engine.add_request(f"A{i}", f"Alice asks question number {i}.", params, user="alice")
    engine.step()
    for i in range(4):
        engine.add_request(f"B{i}", f"Bob asks question number {i}.", params, user="bob")
    sched = engine.scheduler
    shares: list[tuple[int, int]] = []
    last = dict(sched.tokens_by_user)

    def sample_share() -> None:
        nonlocal last
        now = dict(sched.tokens_by_user)
        both_waiting = {s.user for s in sched.waiting} >= {"alice", "bob"}
        if both_waiting:
            shares.append(
                (now.get("alice", 0) - last.get("alice", 0), now.get("bob", 0) - last.get("bob", 0))
            )
        last = now

    order = drive(llm, sample_share)
    a_done = [r for r in order if r.startswith("A")]
    last_b = max(order.index(f"B{i}") for i in range(4))
    assert last_b < order.index(a_done[48]), "bob must finish before alice's last quarter"
    assert shares, "both users were meant to be backlogged for a while"
    alice, bob = (sum(x) for x in zip(*shares, strict=True))
    assert 0.4 <= bob / (alice + bob) <= 0.6, (alice, bob)


def test_weights_shape_the_share() -> None:
    llm = LLM(max_num_seqs=4, kv_cache_memory="128MiB", user_weights={"gold": 3.0})
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for i in range(12):
        engine.add_request(f"g{i}", f"gold {i}", params, user="gold")
        engine.add_request(f"s{i}", f"silver {i}", params, user="silver")
    for _ in range(30):
        engine.step()
    tokens = engine.scheduler.tokens_by_user
    share = tokens["gold"] / (tokens["gold"] + tokens["silver"])
    assert 0.6 <= share <= 0.9, tokens  # weight 3:1 → 0.75
    for rid in [f"{u}{i}" for u in "gs" for i in range(12)]:
        engine.abort_request(rid)
    assert engine.blocks.num_used == 0


def test_high_priority_overtakes_and_preempts() -> None:
    llm = LLM(max_num_seqs=2, kv_cache_memory="128MiB")
    engine = llm.engine
    slow = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"low{i}", f"background job {i}", slow)
    engine.step()
    engine.add_request(
        "urgent", "urgent job", SamplingParams(temperature=0, max_tokens=5), priority=10
    )
    order = drive(llm)
    assert order[0] == "urgent"
    assert engine.stats().num_preemptions >= 1
