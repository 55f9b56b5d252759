"""Continuous batching with a token budget per step. Bookkeeping only: no torch.

Each sequence knows `num_computed_tokens`; a step gives it `num_new_tokens` more. A prompt is
thus prefilled in chunks beside running decodes, and a preempted sequence simply restarts from
zero computed tokens (recompute). The plan is a frozen object the runner executes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from llmos.engine.block_manager import BlockManager
from llmos.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # num_computed_tokens when scheduled
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """This chunk reaches the sequence's last token, so the step samples a new one."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True, slots=True)
class SchedulerPlan:
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...]
    new_blocks: tuple[int, ...] = ()  # handed out by this plan: to be zeroed before use

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # the token budget of one step
    max_prefill_chunk: int | None = None  # cap on one sequence's new tokens per step

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1, "
                             f"got {self.max_num_batched_tokens}")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError(f"max_prefill_chunk must be at least 1, got {self.max_prefill_chunk}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first; the newest is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if self.config.max_prefill_chunk is not None:
            n = min(n, self.config.max_prefill_chunk)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerPlan:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # 1. Running sequences first (decodes and unfinished prefills), oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the newest gives way
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
                i += 1

        # 2. Then admit waiting sequences, in order, while budget and blocks allow.
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            n = self._chunk(seq, budget)
            if not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        return SchedulerPlan(tuple(scheduled), tuple(preempted),
                             tuple(self.blocks.take_new_blocks()))

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Retire a sequence (stopped, cut at length, or aborted) and free its blocks."""
        assert status.finished
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            if not seq.status.finished:
                self.finish(seq, SequenceStatus.FINISHED_ABORTED)
