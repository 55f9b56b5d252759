"""Verifying drafts: one logits row per draft position, sampled as if decoded one by one.

A sequence with drafts d_0..d_{k-1} gets k + 1 rows: row j scores the position after d_{j-1}.
Each row is sampled with exactly what plain decoding would use there: penalties count the
drafts before it, `min_tokens` and bad words look at the output so far, the grammar mask is the
matcher's state after d_0..d_{j-1}, and a seeded request's draw is its seed's draw for that
output position. Then `accept` keeps drafts while the row's sampled token equals the draft, and
ends with the first token that differs (or the bonus token after the last draft).

That is rejection sampling for one-hot drafts: the row's token y is drawn from the model's
distribution p, so the draft x is accepted with probability p(x); when it is not, y is a draw
from p given y != x, which is p with x removed and renormalized. Greedy rows take the argmax,
so greedy output is the longest matching prefix plus the bonus token. And since every row uses
the draw plain decoding would have used, a seeded request gives the same tokens with
speculation on or off (and greedy requests do, bit for bit, where the kernels are
batch-invariant).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from llmos.engine.guard_grammar import GuardedMatcher
from llmos.engine.sequence import Sequence

if TYPE_CHECKING:
    from llmos.engine.sampling import SamplingParams


class DraftView:
    """`seq` as it would be after `extra` more tokens: what the sampler reads of a sequence."""

    __slots__ = ("seq", "extra")

    def __init__(self, seq: Sequence, extra: list[int]) -> None:
        self.seq = seq
        self.extra = extra

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    @property
    def index(self) -> int:
        return self.seq.index

    @property
    def matcher(self) -> object:
        return self.seq.matcher

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.extra

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.extra

    def banned_stop_tokens(self, eos: tuple[int, ...]) -> tuple[int, ...]:
        if self.num_output_tokens >= self.params.min_tokens or self.seq.matcher is not None:
            return ()
        return self.seq.stop_tokens(eos)

    def banned_bad_words(self) -> list[int]:
        out = self.output_token_ids
        banned = []
        for word in self.seq.bad_words_ids:
            head = word[:-1]
            if len(head) <= len(out) and (not head or out[len(out) - len(head) :] == head):
                banned.append(word[-1])
        return banned


def expand(seqs: list[Sequence], drafts: list[tuple[int, ...]]) -> list[Sequence | DraftView]:
    """One sampling row per position: each sequence, then itself after each draft prefix."""
    rows: list[Sequence | DraftView] = []
    for seq, draft in zip(seqs, drafts, strict=True):
        rows.append(seq)
        rows.extend(DraftView(seq, list(draft[: j + 1])) for j in range(len(draft)))
    return rows


def draft_masks(
    seq: Sequence, draft: tuple[int, ...], vocab_size: int, eos: tuple[int, ...]
) -> torch.Tensor:
    """[k, V] bool: the tokens the grammar bans after each draft prefix d_0..d_j. A guarded
    request's block matcher bans its own tokens too (`GuardedMatcher`: both are walked, and
    a token is allowed only where both allow it). Each matcher is walked forward and rolled
    back, so it ends where it began."""
    banned = torch.zeros(len(draft), vocab_size, dtype=torch.bool)
    grammar = _walk(_grammar_of(seq.matcher), draft, vocab_size)
    if grammar is not None:
        banned |= grammar
        dead = banned.all(-1)  # a finished grammar allows nothing more: let EOS end it
        if bool(dead.any()) and eos:
            banned[dead.nonzero().flatten().unsqueeze(1), torch.tensor(list(eos))] = False
    block = seq.matcher.block if isinstance(seq.matcher, GuardedMatcher) else None
    blocked = _walk(block, draft, vocab_size)
    if blocked is not None:  # (drafts of a guarded request stop before EOS: spec.py)
        banned |= blocked
    return banned


def _grammar_of(matcher: object) -> object | None:
    """The llguidance matcher that decides a request's grammar: unwrapped from a guarded
    request's `GuardedMatcher` (None when only guards constrain it) and a `BudgetMatcher`."""
    if isinstance(matcher, GuardedMatcher):
        matcher = matcher.inner
    return getattr(matcher, "inner", matcher)  # a BudgetMatcher wraps the LLMatcher


def _walk(matcher: object | None, draft: tuple[int, ...], vocab_size: int) -> torch.Tensor | None:
    """[k, V] bool: what `matcher` bans after each draft prefix (all banned past the first
    draft it rejects); None without a matcher."""
    if matcher is None:
        return None
    rows = []
    walked = 0
    try:
        for t in draft:
            if not matcher.consume_token(t):  # type: ignore[attr-defined]
                break
            walked += 1
            bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)  # type: ignore[attr-defined]
            rows.append(np.unpackbits(bits, bitorder="little")[:vocab_size] == 0)
    finally:
        if walked:
            matcher.rollback(walked)  # type: ignore[attr-defined]
    banned = torch.ones(len(draft), vocab_size, dtype=torch.bool)
    if rows:
        banned[: len(rows)] = torch.from_numpy(np.stack(rows))
    return banned


def accept(draft: tuple[int, ...] | list[int], sampled: list[int]) -> list[int]:
    """The tokens a verified row set yields: `sampled` (one per row, len(draft) + 1) up to and
    including the first that differs from its draft, or all of them."""
    assert len(sampled) == len(draft) + 1
    out: list[int] = []
    for j, y in enumerate(sampled):
        out.append(y)
        if j == len(draft) or y != draft[j]:
            break
    return out
