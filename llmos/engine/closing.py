"""Structured output that always completes inside `max_tokens`.

A small model at a high temperature can run on inside an unbounded JSON string until
`max_tokens` cuts it, and the client gets invalid JSON with finish reason "length". Here each
constrained sequence keeps a *closing plan*: a short token sequence that takes its grammar from
the current state to the end (close the string, give the remaining required fields their
shortest values, close the brackets, EOS). While the tokens left exceed the plan by a margin
(`WINDOW` plus the grammar's *reach*: what one sampled token that opens an optional field or an
array item may add, see `all_required`) the model samples freely and nothing is computed.
Nearer the end, the tokens it may pick are narrowed to its most likely allowed ones that keep
the plan (a suffix of it, or a plan searched anew) possible in the tokens then left, and the
plan's own next token is always among them: so the output ends valid, finish reason "stop".
A grammar whose plan does not fit `max_tokens` is refused up front with the number of tokens it
needs (see `GrammarCompiler.matchers`).

The plan is found by a greedy depth-first search over llguidance's matcher (`try_consume_tokens`
and `rollback`, about 3 us each; a mask, 0.1-2 ms) that prefers tokens which close strings and
brackets, then short values, then separators, then single ASCII characters; a character that
leaves the allowed set unchanged (another letter of a run) is tried last, so a pattern such as
`[a-z]+@[a-z]+\\.com` moves on to its `@`. The search is bounded (`BUDGET` masks); a grammar it
cannot close (say, one that needs non-ASCII text) keeps the old behaviour.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from llmos.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REACH_CAP = 128  # the most reach counted (a larger one asks more of max_tokens than it saves)
NEAR = 32  # tokens left beyond the plan's length (and reach) at which the plan is kept up to date
WINDOW = 16  # ... and at which sampling is narrowed to tokens that keep the plan possible
TOP_K = 16  # the most likely allowed tokens checked per step inside the window
MASS = 0.95  # ... or fewer, once those checked hold this much of the probability
SEARCHES = 2  # ... of which those that leave the plan get a search of their own
SKIP = 4  # plan tokens one sampled token may cover
NARROW_BUDGET = 40  # masks such a search may compute (it runs on the engine thread)
BUDGET = 400  # masks one search may compute
FANOUT = 8  # children one state may try
LIMIT = 512  # the longest plan searched for

_CLOSER = re.compile(r'\s*["\]}]+\s*')
_VALUE = re.compile(r' ?(""|0|\[\]|\{\}|null|true|false)["\]}]*,?')
_SEPARATOR = re.compile(r'[",: ]*[,:][",: ]*')
_ASCII = (  # punctuation first: in a pattern it is what moves on to the next part
    " -_.@:/,\"'()[]{}<>+=*&^%$#!?;|~`\\\n\t"
    "a0Aebcdfghijklmnopqrstuvwxyz123456789BCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass(frozen=True, slots=True)
class ClosingVocab:
    """The tokens the search tries, best first; `quick` of them are checked for an immediate end."""

    order: np.ndarray  # int64 token ids
    quick: frozenset[int]  # closers and short values, first in `order`
    eos: int
    tokenizer: Tokenizer | None = None  # to retokenize a plan found: often fewer tokens

    @classmethod
    def build(cls, texts: list[str], eos: int, tokenizer: Tokenizer | None = None) -> ClosingVocab:
        def ranked(pattern: re.Pattern[str]) -> list[int]:
            ids = [i for i, t in enumerate(texts) if t and pattern.fullmatch(t)]
            # longer closes more; one that ends in a comma opens the next item or key: last
            return sorted(ids, key=lambda i: (texts[i].endswith(","), -len(texts[i])))

        first = list(dict.fromkeys(ranked(_CLOSER) + ranked(_VALUE)))
        single = {t: i for i, t in reversed(list(enumerate(texts))) if len(t) == 1}
        rest = ranked(_SEPARATOR) + [single[c] for c in _ASCII if c in single]
        order = list(dict.fromkeys(first + rest))
        return cls(np.asarray(order, dtype=np.int64), frozenset(first), eos, tokenizer)


def _allowed(bits: bytes, ids: np.ndarray) -> np.ndarray:
    words = np.frombuffer(bits, dtype=np.uint8)
    return ids[(words[ids >> 3] >> (ids & 7)) & 1 == 1]


def fits(m: llguidance.LLMatcher, tail: list[int], eos: int) -> bool:
    """Whether `tail` (ending in EOS where the grammar needs it) completes the grammar from `m`'s
    state. `m` is left as it was."""
    body = tail[:-1] if tail and tail[-1] == eos else tail
    n = m.try_consume_tokens(body) if body else 0
    ok = n == len(body) and (m.is_accepting() if len(body) < len(tail) else m.is_stopped())
    if n:
        m.rollback(n)
    return ok


def complete(
    m: llguidance.LLMatcher, vocab: ClosingVocab, limit: int = LIMIT, budget: int = BUDGET
) -> list[int] | None:
    """A short token sequence that completes the grammar from `m`'s state (EOS last where the
    grammar needs it), at most `limit` long; None if the bounded search finds none. `m` is left
    as it was."""
    spent = [0]

    def go(depth: int) -> list[int] | None:
        if m.is_stopped():
            return []
        if m.is_accepting():
            return [vocab.eos]
        if depth >= limit or spent[0] >= budget or m.is_error():
            return None
        ff = m.compute_ff_tokens()
        if ff:
            n = m.try_consume_tokens(ff)
            if n:
                sub = go(depth + n)
                m.rollback(n)
                return None if sub is None else ff[:n] + sub
        spent[0] += 1
        bits = m.compute_bitmask()
        here = hash(bits)
        cands = _allowed(bits, vocab.order).tolist()
        ending = None
        for t in cands:
            if t not in vocab.quick:
                break  # `order` lists the quick ones first
            if not m.try_consume_tokens([t]):  # (a mask may admit a token the parser refuses)
                continue
            stopped, accepting = m.is_stopped(), m.is_accepting()
            m.rollback(1)
            if stopped:
                return [t]
            if accepting and ending is None:
                ending = [t, vocab.eos]
        if ending is not None:
            return ending
        later: list[int] = []  # children that allow what this state allows: tried last
        tried: set[int] = set()
        probes = 0
        for phase in (0, 1):
            for t in cands if phase == 0 else later:
                if spent[0] >= budget or (phase == 0 and probes >= FANOUT):
                    break
                if not m.try_consume_tokens([t]):
                    continue
                spent[0] += 1
                probes += phase == 0
                child = hash(m.compute_bitmask())
                if child in tried or (phase == 0 and child == here):
                    if phase == 0 and not later:  # one of them is enough
                        later.append(t)
                    m.rollback(1)
                    continue
                tried.add(child)
                sub = go(depth + 1)
                m.rollback(1)
                if sub is not None:
                    return [t, *sub]
        return None

    plan = go(0)
    if plan and vocab.tokenizer is not None:  # the search went char by char: merge what BPE can
        eos = [vocab.eos] if plan[-1] == vocab.eos else []
        body = plan[: len(plan) - len(eos)]
        text = vocab.tokenizer.decode(body, skip_special_tokens=False)
        merged = vocab.tokenizer.encode(text, add_special_tokens=False) + eos
        if len(merged) < len(plan) and fits(m, merged, vocab.eos):
            return merged
    return plan


class BudgetMatcher:
    """An `LLMatcher` that knows its sequence's `max_tokens` and keeps a closing plan near the
    end. The engine uses it as a matcher (`consume_token`, `is_stopped`, `get_error`); the mask
    builder asks `steer` each step and, inside the window, `narrow` with the step's logits."""

    __slots__ = (
        "inner",
        "vocab",
        "budget",
        "used",
        "plan",
        "hint",
        "failed",
        "_reach",
        "_reach_of",
        "_kept",
    )

    def __init__(
        self,
        inner: llguidance.LLMatcher,
        vocab: ClosingVocab,
        budget: int,
        plan: list[int] | None,
        reach: int | Callable[[], int] = 0,
    ) -> None:
        self.inner = inner
        # how much one freely sampled token may add to the plan (opening an optional field or
        # an array item): narrowing starts that much earlier, so no such jump outruns the budget.
        # A callable is asked only once the end is within `REACH_CAP` (it builds a matcher)
        self._reach = reach if isinstance(reach, int) else None
        self._reach_of = None if isinstance(reach, int) else reach
        self.vocab = vocab
        self.budget = budget  # the sequence's max_tokens
        self.used = 0  # tokens consumed
        self.plan = None if plan is None else list(plan)  # completes the grammar from here
        self.hint = 0 if plan is None else len(plan)  # the plan's last known length
        self.failed = plan is None  # no plan found: behave as a plain matcher
        self._kept: dict[int, list[int]] = {}  # token → the plan after it, from the last `narrow`

    @property
    def left(self) -> int:
        return self.budget - self.used

    def _far(self) -> bool:
        """Whether the end is too far for any jump to matter: nothing to do this step."""
        if self.left > self.hint + REACH_CAP + NEAR:
            return True
        if self._reach is None:
            assert self._reach_of is not None
            self._reach = min(REACH_CAP, self._reach_of())
        return self.left > self.hint + self._reach + NEAR

    # -- the matcher the engine sees ----------------------------------------------------------
    def consume_token(self, token: int) -> bool:
        ok = self.inner.consume_token(token)
        self.used += 1
        if self.plan is not None:
            self._follow(token)
        return ok

    def is_stopped(self) -> bool:
        return self.inner.is_stopped()

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def is_error(self) -> bool:
        return self.inner.is_error()

    def get_error(self) -> str:
        return self.inner.get_error()

    # -- the plan -----------------------------------------------------------------------------
    def _follow(self, token: int) -> None:
        """Keep the plan true after `token`: the rest of it, or a suffix that still completes."""
        assert self.plan is not None
        after = self._kept.get(token)
        self._kept = {}
        if after is not None:
            self.plan = after
        elif self._far():
            self.plan = None  # far from the end: find it again when it matters
        else:
            tail = self._suffix(0)
            self.plan = None if tail is None else self.plan[tail:]
        if self.plan is not None:
            self.hint = len(self.plan)

    def _suffix(self, start: int) -> int | None:
        """The first j in start..start+SKIP with plan[j:] completing the grammar from here, or
        None (a token covers a few plan tokens at most: `"}` covers `"` and `}`)."""
        assert self.plan is not None
        eos, end = self.vocab.eos, min(start + SKIP, len(self.plan)) + 1
        return next((j for j in range(start, end) if fits(self.inner, self.plan[j:], eos)), None)

    def steer(self) -> bool:
        """Before a step's mask: whether this step's sampling must be narrowed (`narrow`)."""
        if self.failed or self.inner.is_stopped() or self.inner.is_error():
            return False
        if self._far():
            return False
        if self.plan is None:
            self.plan = complete(self.inner, self.vocab, limit=min(LIMIT, max(self.left, 1)))
            if self.plan is None:
                log.info(
                    "no closing plan within %d tokens; the budget may cut this output", self.left
                )
                self.failed = True
                return False
            self.hint = len(self.plan)
        return self.left - len(self.plan) <= WINDOW + (self._reach or 0)

    def narrow(self, logits: torch.Tensor | None, allowed: torch.Tensor) -> list[int]:
        """The tokens this step may pick: of the `TOP_K` most likely allowed ones (by `logits`,
        [V]; fewer once they hold `MASS` of the probability), those after which the grammar can
        still complete in the tokens then left (the plan, a suffix of it, or for the `SEARCHES`
        likeliest, a plan searched anew); and always the plan's next token. Without logits,
        only that token."""
        assert self.plan is not None and self.plan
        plan, room = self.plan, self.left - 1  # room: the tokens left after this one
        keep = {plan[0]: plan[1:]}
        if logits is not None:
            scores = logits.float().masked_fill(~allowed, float("-inf"))
            top = torch.topk(scores, min(TOP_K, int(allowed.sum())))
            mass = torch.softmax(scores, -1)[top.indices].cumsum(0).tolist()  # at temperature 1
            searches = SEARCHES
            for t, seen in zip(top.indices.tolist(), mass, strict=True):
                if t in keep:
                    continue
                if t == self.vocab.eos:  # allowed, so the grammar is complete: it ends here
                    keep[t] = []
                    continue
                if not self.inner.try_consume_tokens([t]):
                    continue
                hit = self._suffix(max(0, len(plan) - room))
                after = None if hit is None else plan[hit:]
                if after is None and searches > 0 and room > 0:
                    searches -= 1
                    after = complete(self.inner, self.vocab, room, NARROW_BUDGET)
                self.inner.rollback(1)
                if after is not None and len(after) <= room:
                    keep[t] = after
                if seen >= MASS:
                    break
        self._kept = keep
        return list(keep)


# -- how far one token can move the end -----------------------------------------------------------
def all_required(schema: Any) -> Any:
    """The schema with every property required and every array at least one item long: its
    shortest completion bounds what one token that opens an optional part can add."""
    if isinstance(schema, list):
        return [all_required(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: all_required(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: all_required(v) for k, v in schema["properties"].items()}
        out["required"] = list(schema["properties"])
    if "items" in schema and schema.get("maxItems", 1) >= 1:
        out["minItems"] = max(1, schema.get("minItems", 0))
    return out


_JSON_BLOCK = re.compile(r"%json (\{.*\})\s*$", re.MULTILINE)


def json_blocks(lark: str) -> list[dict[str, Any]]:
    """The JSON schemas a Lark grammar embeds (`rule: %json {...}`, one per line)."""
    out = []
    for text in _JSON_BLOCK.findall(lark):
        try:
            out.append(json.loads(text))
        except ValueError:
            continue
    return out
