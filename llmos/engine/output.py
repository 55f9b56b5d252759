"""Output processing: what a step's new tokens do to their sequences.

A step may give a sequence several tokens (speculation accepts drafts and adds a bonus token).
`OutputProcessor.append(seq, tokens, logprobs)` feeds them one at a time through the same
ladder a single token takes, and stops midway at the first rung that ends the sequence; the
tokens after that one are never appended:

    grammar advance → stop tokens → detokenization → stop strings → grammar complete
    → max_tokens / context length → output filters

**The seam for text filters** (streaming output guards): `seq.output_filters`, a list of
`OutputFilter` objects, each with `feed(delta, final) -> FilterVerdict`. A filter sees the
sequence's text in order, once stop strings can no longer take it back (text that might still
be the start of a stop string is held until it cannot be), and `final=True` with the last
delta. Its verdict may

- hold back the last `hold` characters of what it has seen so far (say, a word that might
  grow into a banned one): `Sequence.visible_text()` releases only what every filter passed,
  and a later verdict replaces this one;
- `stop` the sequence: it finishes with finish_reason `"content_filter"`, and the text it held
  is dropped, so a caller never sees what it stopped.

What a filter still holds when the sequence ends is dropped; the rest is released.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from llmos.engine.sequence import Sequence, SequenceStatus, TokenLogprob
from llmos.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FilterVerdict:
    hold: int = 0  # characters at the end of the text fed so far to keep back for now
    stop: bool = False  # end the sequence ("content_filter"); held text is dropped


PASS = FilterVerdict()


class OutputFilter(Protocol):
    def feed(self, delta: str, final: bool) -> FilterVerdict: ...


class OutputProcessor:
    """Applies accepted tokens to sequences: one ladder for one token or many."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.eos = tokenizer.eos_token_ids
        self.max_model_len = max_model_len

    def append(
        self,
        seq: Sequence,
        tokens: list[int],
        logprobs: list[TokenLogprob] | None = None,
    ) -> tuple[int, SequenceStatus | None]:
        """Append `tokens` to `seq` in order until one ends it. Returns (tokens kept, the
        status that ends the sequence or None). The caller retires a finished sequence."""
        for i, token in enumerate(tokens):
            seq.token_ids.append(token)
            if seq.logprobs is not None and logprobs is not None:
                seq.logprobs.append(logprobs[i])
            status = self._advance_grammar(seq, token) or self._check_stop(seq, token)
            status = self._filter(seq, status)
            if status is not None:
                return i + 1, status
        return len(tokens), None

    @staticmethod
    def _advance_grammar(seq: Sequence, token: int) -> SequenceStatus | None:
        """Feed the token to the sequence's matcher. Only a matcher error (a grammar that hit
        llguidance's limits) ends the sequence here, as aborted rather than unconstrained."""
        if seq.matcher is None or seq.matcher.consume_token(token):
            return None
        log.warning("request %s: grammar failed: %s", seq.request_id, seq.matcher.get_error())
        seq.text += seq.detokenizer.add([token], final=True)
        return SequenceStatus.FINISHED_ABORTED

    def _check_stop(self, seq: Sequence, token: int) -> SequenceStatus | None:
        p = seq.params
        n_out = seq.num_output_tokens
        # (the sampler banned these until min_tokens were out: `Sequence.banned_stop_tokens`)
        if token in seq.stop_tokens(self.eos):
            seq.text += seq.detokenizer.add([], final=True)
            return SequenceStatus.FINISHED_STOPPED
        delta = seq.detokenizer.add([token])
        if delta:
            seq.text += delta
            if p.stop and n_out >= p.min_tokens and cut_at_stop(seq, len(delta)):
                return SequenceStatus.FINISHED_STOPPED
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
            seq.text += seq.detokenizer.add([], final=True)
            return SequenceStatus.FINISHED_STOPPED
        if n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.text += seq.detokenizer.add([], final=True)
            return SequenceStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _filter(seq: Sequence, status: SequenceStatus | None) -> SequenceStatus | None:
        """Feed the output filters the text stop strings can no longer take back."""
        if not seq.output_filters:
            return status
        final = status is not None
        released = len(seq.text) if final else len(seq.text) - seq.stop_hold()
        if released <= seq.filtered_chars and not final:
            return status
        delta = seq.text[seq.filtered_chars : max(released, seq.filtered_chars)]
        seq.filtered_chars = max(released, seq.filtered_chars)
        hold, stopped = 0, False
        for f in seq.output_filters:
            verdict = f.feed(delta, final)
            hold, stopped = max(hold, verdict.hold), stopped or verdict.stop
        seq.filter_hold = hold
        if stopped or final:  # what a filter still holds at the end is never shown
            seq.text = seq.text[: seq.filtered_chars - hold]
            seq.filtered_chars, seq.filter_hold = len(seq.text), 0
        return SequenceStatus.FINISHED_FILTERED if stopped else status


def cut_at_stop(seq: Sequence, delta_len: int) -> bool:
    """Find a stop string that the new text completes; cut the text there."""
    p = seq.params
    assert p.stop is not None
    best: int | None = None
    for stop in p.stop:
        start = max(0, len(seq.text) - delta_len - len(stop) + 1)
        idx = seq.text.find(stop, start)
        if idx != -1 and (best is None or idx < best):
            best = idx + (len(stop) if p.include_stop_str_in_output else 0)
    if best is None:
        return False
    seq.text = seq.text[:best]
    return True
