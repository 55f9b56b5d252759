"""Prevention: `block` literal and regex output guards as a decoding constraint.

The guards become one llguidance terminal, any text that does not contain a match
(`/(?s:.*)/ & ~/(?s:.*)(?:A|B)(?s:.*)/`), followed by its own matcher. `GuardedMatcher` pairs it
with the request's own grammar (JSON schema, regex, tool calls, or none): the step's mask is the
intersection of both (`MaskBuilder`), so every constraint still holds and the model cannot emit
a blocked string. A guard pattern llguidance cannot compile (lookarounds, for one) is left to
the hold-back filter alone, which runs for every output guard in any case.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import llguidance

log = logging.getLogger(__name__)


def block_lark(guards: list[Any] | None) -> str | None:
    """The Lark grammar of text free of every preventable guard's match, or None."""
    sources = [g.regex_source() for g in guards or () if g.preventable]
    if not sources:
        return None
    body = "|".join(f"(?:{s})" for s in sources if s).replace("/", "\\/")
    return f"start: SAFE\nSAFE: /(?s:.*)/ & ~/(?s:.*)(?:{body})(?s:.*)/"


@lru_cache(maxsize=256)
def _checked(lark: str) -> str | None:
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as exc:
        log.info("block guards left to the hold-back filter: %s", exc)
        return None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        log.info("block guards left to the hold-back filter: %s", messages[0] if messages else "")
        return None
    return grammar


_PROTOTYPES: dict[tuple[int, str], Any] = {}  # (tokenizer, grammar) → an unused matcher


def block_matcher(tokenizer: llguidance.LLTokenizer, guards: list[Any] | None) -> Any:
    """A fresh matcher of the guards' block grammar, or None when there is nothing to prevent.
    Copied from one prototype per grammar: a copy shares the lexer states already explored,
    where a new matcher explores them again (~5 ms a row on its first masks)."""
    lark = block_lark(guards)
    grammar = None if lark is None else _checked(lark)
    if grammar is None:
        return None
    key = (id(tokenizer), grammar)
    proto = _PROTOTYPES.get(key)
    if proto is None:
        proto = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if proto.is_error():
            return None
        if len(_PROTOTYPES) >= 256:
            _PROTOTYPES.clear()
        _PROTOTYPES[key] = proto
    return proto.deep_copy()


class GuardedMatcher:
    """A request's matcher (or None) and the block matcher, consumed together. Only the inner
    matcher decides when the output is complete or broken; a block matcher that cannot follow
    (the closing plan forced a token) steps aside and the hold-back filter remains."""

    __slots__ = ("inner", "block", "skip")

    def __init__(self, inner: Any, block: Any, skip: tuple[int, ...] = ()) -> None:
        self.inner = inner
        self.block = block
        self.skip = skip  # EOS: no text, and (with ignore_eos) not the end for the block grammar

    def consume_token(self, token: int) -> bool:
        if token in self.skip:
            pass
        elif self.block is not None and not self.block.consume_token(token):
            log.info("a block guard's matcher could not follow token %d; hold-back only", token)
            self.block = None
        return True if self.inner is None else self.inner.consume_token(token)

    def is_stopped(self) -> bool:
        return False if self.inner is None else self.inner.is_stopped()

    def is_accepting(self) -> bool:
        return True if self.inner is None else self.inner.is_accepting()

    def is_error(self) -> bool:
        return False if self.inner is None else self.inner.is_error()

    def get_error(self) -> str:
        return "" if self.inner is None else self.inner.get_error()
