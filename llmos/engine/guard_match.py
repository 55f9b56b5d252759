"""The matchers behind guards: patterns (literal, regex, canary, PII with its checksums, API-key
shapes) that find spans in text, and scorers (classifier, LLM judge, python) that score text.

A pattern matcher scans text that grows at its end. `scan(text, pos, final)` reports the
matches that cannot change any more and where the text is still undecided: with the `regex`
package, from the start of a partial match (text that more text could turn into a match),
otherwise the last `window - 1` characters, where `window` is the pattern's longest match
(`UNBOUNDED_WINDOW` for patterns with no longest match). Held text is never released
unchecked, so a match split across tokens or chunks is still caught.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmos.engine.guards import Guard

try:  # partial matching: the hold-back is only what could still become a match
    import regex as _partial_re
except ImportError:  # pragma: no cover - the fixed window below still holds every match
    _partial_re = None

UNBOUNDED_WINDOW = 256  # characters held for a pattern with no longest match (re fallback)

# -- PII -----------------------------------------------------------------------------------------
PII_PATTERNS = {
    "email": r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,4}"
    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9-])",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)"
    r"|(?<![\w+])\+\d{1,3}(?:[ .-]?\d{2,4}){3,4}(?!\d)",
    "card": r"(?<![\d-])(?:\d[ -]?){12,18}\d(?!\d)",
    "iban": r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"
    r"(?![A-Za-z0-9])",
    "api_key": r"(?<![A-Za-z0-9])(?:sk-(?:proj-|live-)?[A-Za-z0-9_-]{20,100}"
    r"|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,100}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,100}|AIza[0-9A-Za-z_-]{35}|sk_live_[0-9A-Za-z]{24,100}"
    r"|-----BEGIN [A-Z ]{0,20}PRIVATE KEY-----)(?![A-Za-z0-9])",
}


def luhn_ok(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


VALIDATORS: dict[str, Callable[[str], bool]] = {"card": luhn_ok, "iban": iban_ok}


def _entity_check(m: Any) -> bool:
    """A PII match passes its entity's checksum, where it has one."""
    check = VALIDATORS.get(m.lastgroup or "")
    return check is None or check(m.group())


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int
    guard: Guard


@dataclass(frozen=True, slots=True)
class Scan:
    spans: list[Span]  # matches that no more text can change (for block: any match at all)
    hold: int | None  # first character still undecided, or None
    next_pos: int  # where the next scan starts


def max_width(pattern: str) -> int | None:
    """A regex's longest match in characters, or None when it has none."""
    try:
        hi = re._parser.parse(pattern).getwidth()[1]  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - unknown: treat as unbounded
        return None
    return None if hi >= 2**16 else int(hi)


class PatternMatcher:
    """One guard's regexes (several for PII), each with an optional validator."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        if guard.kind == "pii":
            # one alternation with a group per entity: one search per scan, not one per entity
            wanted = guard.entities or ()
            order = [e for e in ("api_key", "iban", "email", "card", "phone") if e in wanted]
            combined = "|".join(f"(?P<{e}>{PII_PATTERNS[e]})" for e in order)
            parts = [(combined, _entity_check)]
        else:
            source = guard.regex_source()
            assert source is not None, guard
            parts = [(source, None)]
        engine = _partial_re or re
        self.parts = [(engine.compile(p), ok) for p, ok in parts]
        widths = [max_width(p) for p, _ in parts]
        self.window = UNBOUNDED_WINDOW if None in widths else max(w or 1 for w in widths)

    def scan(self, text: str, pos: int, final: bool) -> Scan:
        spans: list[Span] = []
        hold: int | None = None
        for rx, ok in self.parts:
            part_spans, part_hold = self._scan_one(rx, ok, text, pos, final)
            spans += part_spans
            if part_hold is not None:
                hold = part_hold if hold is None else min(hold, part_hold)
        spans.sort(key=lambda s: (s.start, -s.end))
        kept: list[Span] = []
        for s in spans:  # non-overlapping, leftmost first (several PII patterns may overlap)
            if not kept or s.start >= kept[-1].end:
                kept.append(s)
        if hold is not None:
            kept = [s for s in kept if s.start < hold]
        return Scan(kept, hold, len(text) if hold is None else hold)

    def _scan_one(
        self,
        rx: re.Pattern[str],
        ok: Callable[[Any], bool] | None,
        text: str,
        pos: int,
        final: bool,
    ) -> tuple[list[Span], int | None]:
        block = self.guard.action == "block"
        spans: list[Span] = []
        boundary = len(text)
        if _partial_re is None and not final:
            boundary = max(pos, len(text) - self.window + 1)
        p = pos
        while p <= len(text):
            if _partial_re is not None:
                m = rx.search(text, p, partial=not final)  # type: ignore[call-overload]
            else:
                m = rx.search(text, p)
            if m is None:
                break
            if getattr(m, "partial", False):
                return spans, m.start()
            complete_now = m.end() < len(text) or final
            if m.start() >= boundary and not (block and m.end() > m.start()):
                break
            if m.end() > m.start() and (ok is None or ok(m)):
                if block or complete_now:
                    spans.append(Span(m.start(), m.end(), self.guard))
                    if block:
                        return spans, None
                else:
                    return spans, m.start()  # it may still grow
            elif not complete_now:
                return spans, m.start()  # an invalid candidate may still grow into a valid one
            p = m.end() if m.end() > m.start() else m.start() + 1
        return spans, (None if final or boundary >= len(text) else boundary)


# -- scorers -------------------------------------------------------------------------------------
# The baseline prompt-injection scorer: weighted phrases, combined as independent evidence.
# A plug-in point, not a trained model: `register_classifier` adds a real one.
_INJECTION_CUES: list[tuple[re.Pattern[str], float]] = [
    (
        re.compile(
            r"(?i)\b(ignore|disregard|forget|override|bypass)\b.{0,30}\b(previous|prior|above|"
            r"earlier|preceding|all|your|the|system)\b.{0,20}\b(instructions?|directions|rules|"
            r"prompts?|guidelines|task)\b"
        ),
        0.85,
    ),
    (re.compile(r"(?i)\b(new|updated|real|actual) (instructions?|task|orders)\s*:"), 0.5),
    (re.compile(r"(?i)\byou (are|must) now\b|\bfrom now on,? you\b"), 0.4),
    (re.compile(r"(?i)\b(do not|don't|never) (tell|inform|mention|reveal).{0,20}\buser\b"), 0.5),
    (
        re.compile(
            r"(?i)\b(run|execute|call|invoke|use)\b.{0,20}\b(command|tool|function|shell)\b"
        ),
        0.25,
    ),
    (
        re.compile(
            r"(?i)\b(reveal|print|output|leak|send|show)\b.{0,25}\b(system prompt|instructions|"
            r"secrets?|api[ _-]?keys?|passwords?|credentials)\b"
        ),
        0.5,
    ),
    (
        re.compile(
            r"(?i)\b(as an ai|(dear|attention,?|hey|note to|message to|instructions? for) (the )?"
            r"(ai|assistant|model|llm|agent|ai model|language model))\b"
        ),
        0.35,
    ),
    (re.compile(r"(?i)\b(rm -rf|curl [^\n]{0,80}\|\s*(ba)?sh|wget [^\n]{0,80}\|\s*sh)\b"), 0.45),
    (re.compile(r"(?i)<\s*/?\s*(system|im_start|instructions?)\s*>|\[/?(system|INST)\]"), 0.45),
]


def injection_baseline(text: str) -> float:
    miss = 1.0
    for rx, weight in _INJECTION_CUES:
        if rx.search(text):
            miss *= 1.0 - weight
    return 1.0 - miss


CLASSIFIERS: dict[str, Callable[[str], float]] = {"injection-baseline": injection_baseline}


def register_classifier(name: str, score: Callable[[str], float]) -> None:
    """Plug in a classifier: `score(text)` returns a probability in [0, 1]."""
    CLASSIFIERS[name] = score


def python_score(guard: Guard) -> Callable[[str], float]:
    fn = guard.function
    assert callable(fn), guard

    def score(text: str) -> float:
        value = fn(text)
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        value = float(value)
        return value if math.isfinite(value) else 1.0

    return score
