"""Continuous batching with a token budget per step. Bookkeeping only: no torch.

Each sequence knows `num_computed_tokens`; a step gives it `num_new_tokens` more. A prompt is
thus prefilled in chunks beside running decodes, and a preempted sequence restarts from zero
computed tokens (its blocks stay findable in the prefix cache, so the recompute is mostly hits).

Order: higher `priority` first; between users, weighted fair queuing on tokens computed (each
user's virtual time grows by tokens / weight, and the least-served user goes next); then
arrival. Pinned blocks (a finished conversation kept for its next turn) give way first: the
oldest pin is released before anything would wait for blocks or be preempted. A waiting
sequence may preempt a running one of lower priority, or of a user holding more than its fair
share of the batch. The plan is a frozen object the runner executes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmos.engine.block_manager import BlockManager
from llmos.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # num_computed_tokens when scheduled
    num_new_tokens: int
    draft: tuple[int, ...] = ()  # speculative tokens after the last one, to verify this step

    @property
    def completes(self) -> bool:
        """This chunk reaches the sequence's last token, so the step samples a new one."""
        return self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def num_rows(self) -> int:
        """Positions this step computes: the new tokens, then the drafts."""
        return self.num_new_tokens + len(self.draft)


@dataclass(frozen=True, slots=True)
class SchedulerPlan:
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...]
    new_blocks: tuple[int, ...] = ()  # handed out by this plan: to be zeroed before use

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # the token budget of one step
    max_prefill_chunk: int | None = None  # cap on one sequence's new tokens per step
    user_weights: dict[str, float] = field(default_factory=dict)  # default weight 1
    max_fair_preemptions_per_step: int = 4

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError(f"max_prefill_chunk must be at least 1, got {self.max_prefill_chunk}")
        bad = {u: w for u, w in self.user_weights.items() if not w > 0}
        if bad:
            raise ValueError(f"user_weights must be positive, got {bad}")


# (sequence, most draft tokens the budget allows, running sequences) -> draft tokens
Drafter = Callable[[Sequence, int, int], list[int]]


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, blocks: BlockManager, drafter: Drafter | None = None
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.drafter = drafter  # speculation (engine/spec.py): drafts are just more tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.vtime: dict[str | None, float] = {}  # WFQ virtual time per user
        self.tokens_by_user: dict[str | None, int] = {}
        self._active: dict[str | None, int] = {}  # unfinished sequences per user

    # -- fairness -------------------------------------------------------------------------
    def weight(self, user: str | None) -> float:
        return self.config.user_weights.get(user, 1.0) if user is not None else 1.0

    def _rank(self, seq: Sequence) -> tuple[float, float, float, int]:
        """Smaller goes first: priority, then the least-served user, then arrival."""
        return (-seq.priority, self.vtime.get(seq.user, 0.0), seq.arrival, seq.seq_id)

    def _fair_slots(self, user: str | None) -> float:
        total = sum(self.weight(u) for u, n in self._active.items() if n > 0)
        return self.config.max_num_seqs * self.weight(user) / total if total else 0.0

    def _should_yield(self, victim: Sequence, seq: Sequence) -> bool:
        """Whether running `victim` should make way for waiting `seq`."""
        if victim.priority != seq.priority:
            return victim.priority < seq.priority
        if victim.user == seq.user:
            return False
        held = sum(1 for s in self.running if s.user == victim.user)
        return held > self._fair_slots(victim.user) and self.vtime.get(
            seq.user, 0.0
        ) < self.vtime.get(victim.user, 0.0)

    # -- queues ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not self._active.get(seq.user):  # WFQ: a returning user starts at the current floor
            floor = min((self.vtime.get(u, 0.0) for u, n in self._active.items() if n), default=0.0)
            self.vtime[seq.user] = max(self.vtime.get(seq.user, 0.0), floor)
        self._active[seq.user] = self._active.get(seq.user, 0) + 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, budget: int, computed: int | None = None) -> int:
        """New tokens for `seq` this step, from `computed` (default: its computed tokens)."""
        done = seq.num_computed_tokens if computed is None else computed
        n = min(seq.num_tokens - done, budget)
        if self.config.max_prefill_chunk is not None:
            n = min(n, self.config.max_prefill_chunk)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)

    def _can_admit(self, seq: Sequence) -> bool:
        """Whether `seq` has a seat and blocks for its first token, releasing pins for it."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        while True:
            hits = self._hits(seq)
            if self.blocks.can_admit(hits, len(hits) * self.blocks.block_size + 1):
                return True
            if not self.blocks.release_oldest_pin():
                return False

    def _hits(self, seq: Sequence) -> list[int]:
        """Cached blocks `seq` may start from. A cached block's logits were never kept, so a
        sequence that still needs prompt logprobs prefills from position 0."""
        return [] if seq.needs_prompt_logprobs else self.blocks.match_prefix(seq)

    # -- the plan -------------------------------------------------------------------------
    def schedule(self) -> SchedulerPlan:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        self.waiting.sort(key=self._rank)

        # 0. Make way for waiting sequences that deserve a place more than someone running.
        for seq in self.waiting[: self.config.max_fair_preemptions_per_step]:
            if self._can_admit(seq) or not self.running:
                continue
            victim = max(self.running, key=self._rank)
            if not self._should_yield(victim, seq):
                break
            self._preempt(victim)
            preempted.append(victim)
        if preempted:
            self.waiting.sort(key=self._rank)

        # 1. Running sequences (decodes and unfinished prefills), most deserving first.
        done: set[int] = set()
        ran_out = False  # blocks ran out: admit no one new this step
        for seq in sorted(self.running, key=self._rank):
            if seq.status is not SequenceStatus.RUNNING or budget <= 0:
                continue
            n = self._chunk(seq, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                if self.blocks.release_oldest_pin():
                    continue
                victim = max((s for s in self.running if s.seq_id not in done), key=self._rank)
                self._preempt(victim)
                preempted.append(victim)
                ran_out = True
                if victim is seq:
                    break
            else:
                draft = self._draft(seq, n, budget - n)
                scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n, draft))
                done.add(seq.seq_id)
                budget -= n + len(draft)

        # 2. Admit waiting sequences in rank order while budget, seats and blocks allow.
        while (
            self.waiting
            and budget > 0
            and not ran_out
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            hits = self._hits(seq)
            cached = len(hits) * self.blocks.block_size
            n = self._chunk(seq, budget, computed=cached)
            if not self.blocks.can_admit(hits, cached + n):
                if self.blocks.release_oldest_pin():
                    continue
                break
            self.blocks.admit(seq, hits)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            assert self.blocks.allocate(seq, cached + n)
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, cached, n))
            budget -= n

        for s in scheduled:
            user = s.seq.user
            self.vtime[user] = self.vtime.get(user, 0.0) + s.num_new_tokens / self.weight(user)
            self.tokens_by_user[user] = self.tokens_by_user.get(user, 0) + s.num_new_tokens
        return SchedulerPlan(
            tuple(scheduled), tuple(preempted), tuple(self.blocks.take_new_blocks())
        )

    def _draft(self, seq: Sequence, n: int, room: int) -> tuple[int, ...]:
        """A decoding sequence's drafts, if the budget and free blocks have room for them."""
        if self.drafter is None or room < 1 or seq.num_computed_tokens + n != seq.num_tokens:
            return ()
        draft = self.drafter(seq, room, len(self.running))
        if not draft or not self.blocks.allocate(seq, seq.num_tokens + len(draft)):
            return ()  # (no blocks to spare: drafts never preempt anyone)
        return tuple(draft)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Retire a sequence (stopped, cut at length, or aborted) and free its blocks; a
        completed first output of a request with `retain` pins its blocks first."""
        assert status.finished
        if seq.status.finished:
            return
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if (
            seq.retain is not None
            and seq.index == 0
            and status is not SequenceStatus.FINISHED_ABORTED
        ):
            self.blocks.pin(seq.retain, seq)
        self.blocks.free(seq)
        self._active[seq.user] -= 1

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            if not seq.status.finished:
                self.finish(seq, SequenceStatus.FINISHED_ABORTED)
