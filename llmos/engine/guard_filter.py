"""The streaming hold-back filter: output guards checked on text as it is generated.

`GuardFilter` is an output filter for the engine's output seam (`seq.output_filters`): it is
fed the sequence's text in order and answers how much of the end to hold back and whether to
stop. What it releases has passed every output guard:

- pattern guards (literal, regex, canary, PII) hold back text that could still become a match
  (`guard_match.PatternMatcher`); a `block` match stops the sequence (finish_reason
  `content_filter`) and the text it held is dropped; a `redact` match is replaced in the view;
  a `flag` match is recorded;
- scored guards (classifier, python, a judge given a scorer) hold back everything since their
  last check and score every `every` fed deltas (about one per token) and at the end.

`released(seq)` is what a caller may see of a guarded sequence: its visible text with the
redactions applied, and only the token ids and logprobs whose text is all released and not
redacted, so a blocked or redacted string cannot leak through them either.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmos.engine.guard_match import CLASSIFIERS, PatternMatcher, Span, python_score
from llmos.engine.guards import PATTERN_KINDS, Guard, at_stage
from llmos.errors import RequestError

Scorer = Callable[[str], float]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The engine seam's verdict shape (`engine.output.FilterVerdict`)."""

    hold: int = 0
    stop: bool = False


@dataclass(frozen=True, slots=True)
class Trip:
    """A guard that matched: which one, what it did, where, and its score if it has one."""

    guard: str
    kind: str
    action: str
    start: int
    end: int
    score: float | None = None

    def message(self) -> str:
        how = {"block": "stopped the output", "redact": "redacted", "flag": "flagged"}
        score = f" (score {self.score:.2f})" if self.score is not None else ""
        return f"guard {self.guard!r} ({self.kind}) {how[self.action]}{score}"


@dataclass(slots=True)
class _Scored:
    guard: Guard
    score: Scorer
    since: int = 0  # first character not yet scored
    feeds: int = 0  # deltas fed since the last score


def scorer_for(guard: Guard, judges: Mapping[str, Scorer] | None) -> Scorer:
    if guard.kind == "classifier":
        return CLASSIFIERS[guard.model or "injection-baseline"]
    if guard.kind == "python":
        return python_score(guard)
    judge = (judges or {}).get(guard.name)
    if judge is None:
        raise RequestError(
            f"{guard.where}.kind: a judge guard needs a model to ask; in the output stage it runs "
            "where a judge scorer is given (the kernel's stages give one from a backend)",
            param=f"{guard.where}.kind",
        )
    return judge


class GuardFilter:
    def __init__(self, guards: list[Guard], judges: Mapping[str, Scorer] | None = None) -> None:
        self.patterns = [PatternMatcher(g) for g in guards if g.kind in PATTERN_KINDS]
        self.scored = [
            _Scored(g, scorer_for(g, judges)) for g in guards if g.kind not in PATTERN_KINDS
        ]
        self._pos = [0] * len(self.patterns)
        self.text = ""  # everything fed
        self.decided = 0  # characters every guard has passed (or redacted)
        self.redactions: list[Span] = []
        self.flags: list[Trip] = []
        self.trip: Trip | None = None
        self.marks: list[tuple[int, int]] = []  # (output tokens, text length) at each feed
        self._lengths: list[int] = []  # the marks' text lengths (non-decreasing), to bisect
        self.seq: Any = None  # the sequence it filters, for `marks` (set by `attach`)

    @property
    def window(self) -> int:
        """The longest hold-back in characters: the longest pattern match."""
        return max((m.window for m in self.patterns), default=0)

    def feed(self, delta: str, final: bool) -> Verdict:
        if self.trip is not None:
            return Verdict(len(self.text) - self.decided, True)
        self.text += delta
        if self.seq is not None:
            self.marks.append((self.seq.num_output_tokens, len(self.seq.text)))
            self._lengths.append(len(self.seq.text))
        holds = [len(self.text)]
        for i, m in enumerate(self.patterns):
            scan = m.scan(self.text, self._pos[i], final)
            self._pos[i] = scan.next_pos
            for span in scan.spans:
                self._act(span, None)
            if scan.hold is not None:
                holds.append(scan.hold)
        for s in self.scored:
            s.feeds += 1 if delta else 0
            if s.since >= len(self.text):
                continue
            if final or s.feeds >= s.guard.every:
                value = s.score(self.text)
                if value >= s.guard.threshold:
                    self._act(Span(s.since, len(self.text), s.guard), value)
                s.since, s.feeds = len(self.text), 0
            else:
                holds.append(s.since)
        if self.trip is not None:
            return Verdict(len(self.text) - self.decided, True)
        self.decided = max(self.decided, min(holds))
        return Verdict(len(self.text) - self.decided, False)

    def _act(self, span: Span, score: float | None) -> None:
        g = span.guard
        trip = Trip(g.name, g.kind, g.action, span.start, span.end, score)
        if g.action == "block":
            if self.trip is None:
                self.trip = trip
        elif g.action == "redact":
            if not any(r.start < span.end and span.start < r.end for r in self.redactions):
                self.redactions.append(span)
                self.redactions.sort(key=lambda r: r.start)
            self.flags.append(trip)
        else:
            self.flags.append(trip)

    def view(self, text: str) -> str:
        """`text` (a released prefix of what was fed) with the redactions applied."""
        if not self.redactions:
            return text
        out, at = [], 0
        for r in self.redactions:
            if r.start >= len(text):
                break
            out += [text[at : r.start], r.guard.replacement]
            at = min(r.end, len(text))
        out.append(text[at:])
        return "".join(out)

    def released_tokens(self, released_chars: int, finished: bool) -> int:
        """How many output tokens have all their text inside the released characters."""
        i = bisect.bisect_right(self._lengths, released_chars)
        return self.marks[i - 1][0] if i else 0

    def hidden(self, start: int, end: int) -> bool:
        return any(r.start < end and start < r.end for r in self.redactions)


@dataclass(slots=True)
class Checked:
    """A whole text checked at once (the kernel's input and tool_output stages)."""

    text: str  # with redactions applied
    blocked: Trip | None
    trips: list[Trip] = field(default_factory=list)  # every match, flags and redactions too


def check_text(
    guards: list[Guard], text: str, judges: Mapping[str, Scorer] | None = None
) -> Checked:
    f = GuardFilter(guards, judges)
    f.feed(text, final=True)
    trips = [*f.flags, *([f.trip] if f.trip else [])]
    return Checked(f.view(text), f.trip, trips)


def output_filters(params: Any) -> list[GuardFilter]:
    """The output filter of one sequence of a request with output guards (else none)."""
    guards = at_stage(list(getattr(params, "guards", None) or ()), "output")
    return [GuardFilter(guards)] if guards else []


def attach(seq: Any) -> None:
    """Give a new sequence its guard filter (engine: add_request)."""
    filters = output_filters(seq.params)
    for f in filters:
        f.seq = seq
    if filters:
        seq.output_filters = [*getattr(seq, "output_filters", []), *filters]


def released(seq: Any, text: str) -> tuple[str, list[int], list[Any] | None]:
    """(text, token ids, logprobs) a caller may see of `seq`, given its visible `text`."""
    ids, lps = seq.output_token_ids, (list(seq.logprobs) if seq.logprobs is not None else None)
    guard = next(
        (f for f in getattr(seq, "output_filters", ()) if isinstance(f, GuardFilter)), None
    )
    if guard is None:
        return text, ids, lps
    finished = seq.status.finished
    count = guard.released_tokens(len(text), finished)
    if finished and guard.trip is None:
        count = len(ids)
    keep = list(range(min(count, len(ids))))
    if guard.redactions:  # drop the tokens whose text was (even partly) redacted
        visible, prev_tokens, prev_len = [], 0, 0
        for tokens, length in [*guard.marks, (len(ids), len(guard.text))]:
            if tokens > prev_tokens:
                if not guard.hidden(prev_len, max(length, prev_len + 1)):
                    visible += range(prev_tokens, tokens)
                prev_tokens, prev_len = tokens, length
        keep = [k for k in visible if k < len(keep)]
    return (
        guard.view(text),
        [ids[k] for k in keep],
        None if lps is None else [lps[k] for k in keep if k < len(lps)],
    )
