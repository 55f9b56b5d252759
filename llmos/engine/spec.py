"""Speculative decoding: draft proposers, and the speculator that sizes each sequence's drafts.

A proposer guesses the next tokens of a sequence from text it has seen; the model verifies the
guesses in the step it would have run anyway (the drafts ride in the scheduler's plan as extra
tokens of their sequence, and the runner scores every position in one forward pass). Accepted
drafts are tokens the model itself would have produced, so the output does not change.

- `NgramProposer` (prompt lookup): the last n tokens' latest earlier occurrence in the
  sequence's own prompt and output, and what followed it.
- `SuffixProposer` (SuffixDecoding, arXiv 2411.04975): the longest suffix of the context that
  occurred before, in the sequence itself or in a bounded global index of recent outputs; the
  draft follows the most frequent continuation token by token while its estimated probability
  (the product of each step's frequency share) stays above a floor, and is at most about as
  long as the match (`alpha * match length`), so a short, chance match proposes little.

Both look up an `NgramIndex`: for a few n-gram lengths, a map from the n tokens before a
position to the positions that followed them. A draft model can plug in later as a third
`Proposer` (`propose` + `forget`).

`Speculator` keeps each sequence's draft length adaptive: an estimate of its per-token
acceptance rate sets the length that maximizes expected tokens per unit of step cost (a step's
cost grows with its rows), down to none; a sequence at length 0 probes again now and then.
Large batches, where extra rows cost real compute, get no drafts at all (`max_batch`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from llguidance import LLMatcher

from llmos.engine.closing import NEAR, REACH_CAP, BudgetMatcher
from llmos.engine.guard_grammar import GuardedMatcher
from llmos.engine.sequence import Sequence

SEP = -1  # between documents in the global index: no n-gram spans it


class NgramIndex:
    """Positions by the n tokens before them, for each n in `lengths` (grows with `extend`)."""

    __slots__ = ("tokens", "lengths", "maps", "max_hits")

    def __init__(self, lengths: tuple[int, ...], max_hits: int = 32) -> None:
        self.tokens: list[int] = []
        self.lengths = tuple(sorted(lengths, reverse=True))  # longest first
        self.maps: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in self.lengths}
        self.max_hits = max_hits  # latest positions kept per n-gram

    def extend(self, tokens: Iterable[int]) -> None:
        toks = self.tokens
        for t in tokens:
            end = len(toks)  # position of t: the n-grams ending just before it lead to it
            for n in self.lengths:
                if end >= n:
                    key = tuple(toks[end - n : end])
                    if SEP in key:
                        continue
                    hits = self.maps[n].setdefault(key, [])
                    hits.append(end)
                    if len(hits) > self.max_hits:
                        del hits[0]
            toks.append(t)

    def lookup(self, context: list[int]) -> tuple[int, list[int]]:
        """The longest indexed n-gram that ends `context`: (n, positions after it), or (0, [])."""
        for n in self.lengths:
            if len(context) >= n:
                hits = self.maps[n].get(tuple(context[-n:]))
                if hits:
                    return n, hits
        return 0, []


class Proposer(Protocol):
    def propose(self, seq: Sequence, k: int) -> list[int]: ...

    def forget(self, seq: Sequence, finished: bool) -> None: ...


class _PerSequence:
    """A per-sequence `NgramIndex` over prompt + output, kept up to date lazily."""

    def __init__(self, lengths: tuple[int, ...]) -> None:
        self.lengths = lengths
        self.index: dict[int, NgramIndex] = {}

    def of(self, seq: Sequence) -> NgramIndex:
        idx = self.index.get(seq.seq_id)
        if idx is None:
            idx = self.index[seq.seq_id] = NgramIndex(self.lengths)
        if len(idx.tokens) < seq.num_tokens:
            idx.extend(seq.token_ids[len(idx.tokens) :])
        return idx

    def drop(self, seq: Sequence) -> None:
        self.index.pop(seq.seq_id, None)


class NgramProposer:
    """Prompt lookup: copy what followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, lengths: tuple[int, ...] = (4, 3, 2)) -> None:
        self.seqs = _PerSequence(lengths)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        idx = self.seqs.of(seq)
        _, hits = idx.lookup(seq.token_ids)
        if not hits:
            return []
        start = hits[-1]
        return idx.tokens[start : start + k]

    def forget(self, seq: Sequence, finished: bool) -> None:
        self.seqs.drop(seq)


@dataclass(slots=True)
class _Candidates:
    tokens: list[int]
    starts: list[int]


def _continue(sources: list[_Candidates], k: int, min_prob: float) -> list[int]:
    """Follow the most frequent next token across all occurrences, token by token, while the
    path's estimated probability stays at least `min_prob` (SuffixDecoding's path score)."""
    live = [(src.tokens, s) for src in sources for s in src.starts]
    out: list[int] = []
    prob = 1.0
    while live and len(out) < k:
        counts: dict[int, int] = {}
        for toks, s in live:
            pos = s + len(out)
            if pos < len(toks) and toks[pos] != SEP:
                counts[toks[pos]] = counts.get(toks[pos], 0) + 1
        if not counts:
            break
        best = max(counts, key=counts.__getitem__)
        prob *= counts[best] / len(live)
        if prob < min_prob:
            break
        out.append(best)
        live = [
            (toks, s)
            for toks, s in live
            if s + len(out) - 1 < len(toks) and toks[s + len(out) - 1] == best
        ]
    return out


class SuffixProposer:
    """SuffixDecoding: longest-match lookup in the sequence and in recent outputs, with a
    frequency-scored continuation whose length follows the match length."""

    LENGTHS = (24, 16, 12, 8, 6, 4, 3, 2)

    def __init__(
        self,
        alpha: float = 2.0,
        min_prob: float = 0.15,
        global_tokens: int = 65536,
    ) -> None:
        self.alpha = alpha  # draft at most alpha * match length tokens
        self.min_prob = min_prob
        self.seqs = _PerSequence(self.LENGTHS)
        self.global_tokens = global_tokens  # bound on the global index (recent outputs)
        self.recent: deque[list[int]] = deque()
        self.glob = NgramIndex(self.LENGTHS)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        idx = self.seqs.of(seq)
        ctx = seq.token_ids
        n, hits = idx.lookup(ctx)
        gn, ghits = self.glob.lookup(ctx)
        sources: list[_Candidates] = []
        if n >= gn and hits:
            sources.append(_Candidates(idx.tokens, hits))
        if gn >= n and ghits:
            sources.append(_Candidates(self.glob.tokens, ghits))
        match = max(n, gn)
        if not sources:
            return []
        return _continue(sources, min(k, max(1, int(self.alpha * match))), self.min_prob)

    def forget(self, seq: Sequence, finished: bool) -> None:
        self.seqs.drop(seq)
        if finished and seq.num_output_tokens > 1:
            self._remember(seq.output_token_ids)

    def _remember(self, output: list[int]) -> None:
        self.recent.append(output)
        self.glob.extend([*output, SEP])
        if len(self.glob.tokens) > self.global_tokens:  # keep the newer half, reindexed
            while sum(len(o) + 1 for o in self.recent) > self.global_tokens // 2:
                self.recent.popleft()
            self.glob = NgramIndex(self.LENGTHS)
            for out in self.recent:
                self.glob.extend([*out, SEP])


PROPOSERS = {"ngram": NgramProposer, "suffix": SuffixProposer}
MAX_BACKOFF = 4  # a probe interval doubles at most this many times (16 -> 256 steps)


class Speculator:
    """Sizes and asks for drafts per sequence; learns from what verification accepted.

    Per-sequence acceptance is an exponential average of accepted / drafted. With per-token
    acceptance a, a draft of length k yields (1 - a^(k+1)) / (1 - a) tokens for a step that
    costs 1 + rho * k, in units of what one plain token costs at this batch size: a step reads
    the weights once (c0) and computes each row (c_row), so a plain token costs
    (c0 + c_row * B) / B and a draft row costs c_row, and rho = c_row * B / (c0 + c_row * B).
    At batch 1 a draft row is cheap next to the weight read; at batch 16 it costs almost a
    whole plain token, so only drafts that are nearly sure pay. c_row / c0 starts at
    `row_ratio` and is refit from the engine's own decode steps (`observe_step`). The draft
    length is the best of 0..k_max by that ratio; past `max_batch` running sequences there are
    no drafts at all."""

    def __init__(
        self,
        proposer: Proposer,
        max_tokens: int,
        row_ratio: float = 0.3,
        max_batch: int = 32,
        probe_every: int = 16,
    ) -> None:
        self.proposer = proposer
        self.max_tokens = max_tokens  # k_max
        self.row_ratio = row_ratio  # c_row / c0: one row's compute next to one weight read
        self.max_batch = max_batch  # more running sequences than this: no drafts
        self.probe_every = probe_every
        self._fit = [0.0] * 5  # fading sums for observe_step's fit: n, x, y, xx, xy
        self.rate: dict[int, float] = {}  # seq_id -> acceptance estimate
        self.idle: dict[int, int] = {}  # seq_id -> steps since it last drafted (while k = 0)
        self.misses: dict[int, int] = {}  # seq_id -> probes in a row that found nothing
        self._probing: set[int] = set()  # seq_ids whose drafts this step are a probe

    def observe_step(self, rows: int, seconds: float) -> None:
        """A decode step's rows and time: refit c0 + c_row * rows (least squares, with old
        steps fading), so `row_ratio` follows the machine rather than a constant."""
        f = self._fit
        for i, v in enumerate((1.0, rows, seconds, rows * rows, rows * seconds)):
            f[i] = 0.99 * f[i] + v
        n, sx, sy, sxx, sxy = f
        var = n * sxx - sx * sx
        if n < 20 or var < 1e-9 * n * n:  # too few steps, or all of one size
            return
        c_row = (n * sxy - sx * sy) / var
        c0 = (sy - c_row * sx) / n
        if c0 > 0:
            self.row_ratio = min(2.0, max(0.02, c_row / c0))

    def row_cost(self, batch: int) -> float:
        r = self.row_ratio * max(1, batch)
        return r / (1 + r)

    def best_k(self, rate: float, batch: int = 1) -> int:
        rho = self.row_cost(batch)
        best, best_gain = 0, 1.0
        for k in range(1, self.max_tokens + 1):
            tokens = (1 - rate ** (k + 1)) / (1 - rate) if rate < 1 else k + 1
            gain = tokens / (1 + rho * k)
            if gain > best_gain * 1.02:
                best, best_gain = k, gain
        return best

    def draft(self, seq: Sequence, room: int, batch: int) -> list[int]:
        """Drafts for `seq`'s next step: at most `room` tokens (budget and max_tokens left)."""
        if batch > self.max_batch or room < 1 or not seq.params.speculation:
            return []
        rate = self.rate.get(seq.seq_id, 0.8)
        k = self.best_k(rate, batch)
        if k == 0:  # not paying: probe with a short draft now and then
            # (sequences start at different points of the interval, so a batch's probes do
            # not land in one step; each probe that finds nothing doubles the interval)
            idle = self.idle.get(seq.seq_id, seq.seq_id % self.probe_every) + 1
            self.idle[seq.seq_id] = idle
            if idle < self.probe_every << min(self.misses.get(seq.seq_id, 0), MAX_BACKOFF):
                return []
            self.idle[seq.seq_id] = 0
            self._probing.add(seq.seq_id)
            k = 2
        if seq.matcher is not None and not isinstance(
            seq.matcher, LLMatcher | BudgetMatcher | GuardedMatcher
        ):
            return []  # (a matcher kind whose draft masks verify.py cannot compute)
        draft = self.proposer.propose(seq, min(k, room))
        if draft and seq.matcher is not None:
            draft = draft[: _grammar_prefix(seq, draft)]
        if not draft and seq.seq_id in self._probing:  # a probe with nothing to draft: a miss
            self.observe(seq, 0, 0)
        return draft

    def observe(self, seq: Sequence, drafted: int, accepted: int) -> None:
        if drafted:
            old = self.rate.get(seq.seq_id, 0.8)
            self.rate[seq.seq_id] = 0.6 * old + 0.4 * (accepted / drafted)
        if seq.seq_id in self._probing:
            self._probing.discard(seq.seq_id)
            if accepted:
                self.misses.pop(seq.seq_id, None)
            else:
                self.misses[seq.seq_id] = self.misses.get(seq.seq_id, 0) + 1

    def forget(self, seq: Sequence) -> None:
        self.rate.pop(seq.seq_id, None)
        self.idle.pop(seq.seq_id, None)
        self.misses.pop(seq.seq_id, None)
        self._probing.discard(seq.seq_id)
        self.proposer.forget(seq, seq.status.finished and seq.finish_reason != "abort")


def _grammar_prefix(seq: Sequence, draft: list[int]) -> int:
    """How many leading drafts the sequence's grammar accepts (llguidance `validate_tokens`),
    and for a guarded request its block matcher too (a draft stops before EOS there, which
    the block grammar does not consume). Near its max_tokens a `BudgetMatcher` narrows
    sampling with each step's logits, which a draft row cannot reproduce: drafts stop short of
    that window."""
    matcher = seq.matcher
    assert matcher is not None
    if isinstance(matcher, GuardedMatcher):
        if matcher.skip:
            draft = list(itertools.takewhile(lambda t: t not in matcher.skip, draft))
        if matcher.block is not None and draft:
            draft = draft[: int(matcher.block.validate_tokens(draft))]
        if matcher.inner is None or not draft:
            return len(draft)
        matcher = matcher.inner
    if isinstance(matcher, BudgetMatcher):
        if not matcher.failed:
            if not matcher._far():  # (also learns the grammar's reach, once)
                return 0
            reach = REACH_CAP if matcher._reach is None else matcher._reach
            room = matcher.left - (matcher.hint + reach + NEAR) - 1
            draft = draft[: max(0, room)]
        inner = matcher.inner
    else:
        inner = matcher
    return int(inner.validate_tokens(draft)) if draft else 0
