"""Block manager and scheduler: pure bookkeeping, no model."""

from __future__ import annotations

import pytest

from llmos.engine.block_manager import BlockManager
from llmos.engine.sampling import SamplingParams
from llmos.engine.scheduler import Scheduler, SchedulerConfig
from llmos.engine.sequence import Sequence, SequenceStatus


class _NoDetok:
    def add(self, ids: list[int], final: bool = False) -> str:
        return ""


def make_seq(n_prompt: int, rid: str = "r", max_tokens: int = 16) -> Sequence:
    return Sequence(
        rid,
        list(range(1, n_prompt + 1)),
        SamplingParams(max_tokens=max_tokens),
        _NoDetok(),
        max_tokens=max_tokens,
    )  # type: ignore[arg-type]


def test_allocate_grows_by_blocks_and_free_returns_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(5)
    assert bm.allocate(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free == 6
    assert bm.allocate(seq, 8) and len(seq.block_table) == 2  # still fits
    assert bm.allocate(seq, 9) and len(seq.block_table) == 3
    bm.free(seq)
    assert bm.num_free == 8 and seq.block_table == []
    assert all(c == 0 for c in bm.ref_counts)


def test_allocate_fails_without_partial_change() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = make_seq(8, "a"), make_seq(8, "b")
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 8)  # needs 2, only 1 free
    assert b.block_table == [] and bm.num_free == 1


def test_lowest_block_ids_are_used_first() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    seq = make_seq(12)
    bm.allocate(seq, 12)
    assert seq.block_table == [0, 1, 2]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def _run_step(sched: Scheduler) -> dict[str, int]:
    """Apply a plan as the engine would: advance computed tokens; completing seqs get a token."""
    plan = sched.schedule()
    got = {}
    for s in plan.scheduled:
        s.seq.num_computed_tokens = s.start + s.num_new_tokens
        got[s.seq.request_id] = s.num_new_tokens
        if s.completes:
            s.seq.token_ids.append(7)
            if s.seq.num_output_tokens >= s.seq.max_tokens:
                sched.finish(s.seq, SequenceStatus.FINISHED_LENGTH)
    return got


def test_token_budget_chunks_long_prompt_beside_decodes() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), bm)
    short = make_seq(3, "short")
    sched.add(short)
    assert _run_step(sched) == {"short": 3}
    long = make_seq(25, "long")
    sched.add(long)
    # the running decode takes 1 token, the new prompt gets the remaining 9
    assert _run_step(sched) == {"short": 1, "long": 9}
    assert _run_step(sched) == {"short": 1, "long": 9}
    assert _run_step(sched) == {"short": 1, "long": 7}  # 25 = 9 + 9 + 7
    assert long.num_output_tokens == 1
    assert _run_step(sched) == {"short": 1, "long": 1}


def test_new_requests_join_on_the_next_step() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), bm)
    sched.add(make_seq(4, "a"))
    _run_step(sched)
    sched.add(make_seq(4, "b"))
    assert _run_step(sched) == {"a": 1, "b": 4}


def test_newest_is_preempted_when_blocks_run_out_and_recomputed_later() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)  # 16 slots
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), bm)
    old, new = make_seq(7, "old", max_tokens=8), make_seq(7, "new", max_tokens=8)
    sched.add(old)
    sched.add(new)
    _run_step(sched)  # both prefilled: 2 blocks each, all 4 used
    _run_step(sched)  # one decode each: 8 tokens computed, still 2 blocks
    assert bm.num_free == 0
    plan = sched.schedule()  # old needs a 3rd block for token 9 → new is preempted
    assert [s.seq.request_id for s in plan.scheduled] == ["old"]
    assert plan.preempted == (new,)
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert new.block_table == [] and sched.waiting[0] is new
    for s in plan.scheduled:
        s.seq.num_computed_tokens = s.start + s.num_new_tokens
        s.seq.token_ids.append(7)
    while old.status is not SequenceStatus.FINISHED_LENGTH:
        _run_step(sched)
    # once old is done, new is recomputed from scratch (prompt + its 2 generated tokens)
    got = _run_step(sched)
    assert got == {"new": 9}
    while sched.has_work:
        _run_step(sched)
    assert bm.num_free == 4


def test_a_sequence_preempts_itself_when_it_is_the_newest() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), bm)
    a = make_seq(8, "a", max_tokens=4)
    sched.add(a)
    _run_step(sched)  # prefill 8 → 2 blocks; a has 9 tokens now
    plan = sched.schedule()  # needs a 3rd block: none, and no one else to preempt
    assert plan.preempted == (a,) and not plan.scheduled
    assert bm.num_free == 2


def test_max_num_seqs_caps_the_batch() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), bm)
    for i in range(3):
        sched.add(make_seq(2, f"r{i}"))
    assert set(_run_step(sched)) == {"r0", "r1"}
    assert len(sched.waiting) == 1


def test_abort_frees_blocks_of_running_and_waiting() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), bm)
    a, b = make_seq(6, "a"), make_seq(6, "b")
    sched.add(a)
    _run_step(sched)
    sched.add(b)
    sched.abort([a, b])
    assert bm.num_free == 8 and not sched.has_work
    assert a.status is SequenceStatus.FINISHED_ABORTED


# -- prefix cache ------------------------------------------------------------------------------


def _computed(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the whole sequence was computed and register its full blocks."""
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_shared_prefix_shares_blocks_and_survives_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(10, "a")  # tokens 1..10: blocks [1-4], [5-8] are full
    _computed(bm, a)
    b = make_seq(10, "b")
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    bm.admit(b, hits)
    assert b.num_computed_tokens == 8 and bm.ref_counts[hits[0]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8 and bm.num_cached == 2  # freed, but still findable
    c = make_seq(12, "c")
    assert bm.match_prefix(c) == hits
    assert bm.hit_tokens == 8 and bm.queried_tokens == 10


def test_the_last_token_is_always_computed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(8, "a")  # exactly two full blocks
    _computed(bm, a)
    b = make_seq(8, "b")
    assert len(bm.match_prefix(b)) == 1  # the second block holds the last token


def test_a_different_prefix_misses_even_with_equal_later_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(9, "a")
    _computed(bm, a)
    b = Sequence(
        "b",
        [99, 2, 3, 4, 5, 6, 7, 8, 9],
        SamplingParams(),
        _NoDetok(),  # type: ignore[arg-type]
        max_tokens=4,
    )
    assert bm.match_prefix(b) == []  # block 2 equals a's, but its chain differs


def test_cached_blocks_are_evicted_lru_when_needed() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(9, "a")
    _computed(bm, a)  # 3 blocks, 2 named
    bm.free(a)
    assert bm.num_free == 4 and bm.num_cached == 2
    big = Sequence(
        "big",
        list(range(100, 116)),
        SamplingParams(),
        _NoDetok(),  # type: ignore[arg-type]
        max_tokens=4,
    )
    assert bm.allocate(big, 16)  # needs every block: the named ones are evicted
    assert bm.num_cached == 0 and bm.match_prefix(make_seq(9, "again")) == []


def test_prefix_caching_off() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, prefix_caching=False)
    a = make_seq(10, "a")
    _computed(bm, a)
    assert bm.match_prefix(make_seq(10, "b")) == []


# -- priorities and fairness -------------------------------------------------------------------


def test_higher_priority_goes_first_and_preempts_lower() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), bm)
    low = [make_seq(3, f"low{i}") for i in range(2)]
    for s in low:
        sched.add(s)
    _run_step(sched)
    urgent = make_seq(3, "urgent")
    urgent.priority = 5
    sched.add(urgent)
    plan = sched.schedule()
    assert len(plan.preempted) == 1 and plan.preempted[0] in low
    assert "urgent" in {s.seq.request_id for s in plan.scheduled}


def test_users_share_seats_fairly() -> None:
    bm = BlockManager(num_blocks=256, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), bm)
    for i in range(12):
        s = make_seq(3, f"a{i}", max_tokens=50)
        s.user = "alice"
        sched.add(s)
    _run_step(sched)
    for i in range(12):
        s = make_seq(3, f"b{i}", max_tokens=50)
        s.user = "bob"
        sched.add(s)
    counts = {"alice": 0, "bob": 0}
    for _ in range(40):
        plan = sched.schedule()
        for s in plan.scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
            if s.completes:
                s.seq.token_ids.append(7)
            counts[s.seq.user] += s.num_new_tokens  # type: ignore[index]
    share = counts["bob"] / (counts["alice"] + counts["bob"])
    assert 0.4 <= share <= 0.6, counts
