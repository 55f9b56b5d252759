"""Guards as data: a name, a stage, a kind and an action, checked where they are declared.

A guard is the same dict in every place it is declared (`SamplingParams(guards=[...])`, the
`guards` extra of an HTTP request, `llmos serve --guards guards.yaml`, a program's `guards:`):

    {"name": "no-secret", "stage": "output", "kind": "regex", "pattern": "(?i)swordfish",
     "action": "block"}

Stages: `input` (the user's messages), `tool_output` (what a tool returned, before the model
reads it) and `output` (what the model writes, checked while it streams). Actions: `block`,
`redact` (replace the span) and `flag` (record only). The matchers live in `guard_match.py`,
the streaming hold-back filter in `guard_filter.py`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from llmos.errors import RequestError

STAGES = ("input", "tool_output", "output")
ACTIONS = ("block", "redact", "flag")
KINDS = ("literal", "regex", "canary", "pii", "classifier", "judge", "python")
PII_ENTITIES = ("email", "phone", "card", "iban", "api_key")
PATTERN_KINDS = ("literal", "regex", "canary", "pii")  # matched on text, with a hold-back
SCORE_KINDS = ("classifier", "judge", "python")  # a score per window of text
# a canary is a marker in the system prompt that must never be repeated: `canary: XYZ123`
CANARY_IN_PROMPT = re.compile(r"(?i)\bcanary(?:[ _-]?token)?\s*[:=]\s*([A-Za-z0-9_-]{6,})")


def _problem(where: str, name: str, message: str) -> RequestError:
    return RequestError(f"{where}.{name}: {message}", param=f"{where}.{name}")


@dataclass(slots=True)
class Guard:
    """One guard, validated. `where` names it in errors (`guards[2]`)."""

    name: str
    stage: str = "output"
    kind: str = "regex"
    action: str = "block"
    pattern: str | None = None  # regex: a Python regex
    value: str | list[str] | None = None  # literal and canary: the string(s)
    ignore_case: bool = False  # literal, canary
    entities: list[str] | None = None  # pii: which ones (default: all)
    threshold: float = 0.5  # classifier, judge, python: trip at this score or above
    every: int = 16  # classifier, judge, python: score every N tokens (the window)
    model: str | None = None  # classifier: a registered name; judge: a backend name
    question: str | None = None  # judge: the yes/no question ("Is this text ...?")
    function: str | Callable[[str], float | bool] | None = None  # python: "module:attr"
    replacement: str = "[REDACTED]"  # redact: what a span becomes
    prevent: bool = True  # block literal/regex: also compile it into the decoding constraint
    on_trip: str = "continue"  # kernel stages: after a block, "continue" (quarantine) or "stop"
    where: str = field(default="guards[0]", repr=False, compare=False)

    def __post_init__(self) -> None:
        w = self.where
        if not isinstance(self.name, str) or not self.name.strip():
            raise _problem(w, "name", f"must be a non-empty string, got {self.name!r}")
        for attr, allowed in (("stage", STAGES), ("kind", KINDS), ("action", ACTIONS)):
            if getattr(self, attr) not in allowed:
                raise _problem(
                    w, attr, f"must be one of {', '.join(allowed)}, got {getattr(self, attr)!r}"
                )
        if self.on_trip not in ("continue", "stop"):
            raise _problem(w, "on_trip", f"must be 'continue' or 'stop', got {self.on_trip!r}")
        for attr in ("ignore_case", "prevent"):
            if not isinstance(getattr(self, attr), bool):
                raise _problem(w, attr, f"must be true or false, got {getattr(self, attr)!r}")
        if not isinstance(self.replacement, str):
            raise _problem(w, "replacement", "must be a string")
        if isinstance(self.value, str):
            self.value = [self.value]
        check = getattr(self, f"_check_{self.kind}")
        check(w)

    # -- per kind ---------------------------------------------------------------------------
    def _check_literal(self, w: str) -> None:
        v = self.value
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            raise _problem(w, "value", "must be a non-empty string or list of non-empty strings")

    def _check_canary(self, w: str) -> None:
        if self.value is not None:  # else bound later, from the system prompt (`with_canary`)
            self._check_literal(w)

    def _check_regex(self, w: str) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise _problem(w, "pattern", "must be a non-empty regular expression")
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise _problem(w, "pattern", f"is not a valid regular expression: {exc}") from None
        if compiled.fullmatch(""):
            raise _problem(w, "pattern", "matches the empty string, so it would match anywhere")

    def _check_pii(self, w: str) -> None:
        if self.entities is None:
            self.entities = list(PII_ENTITIES)
        bad = (
            [self.entities]
            if not isinstance(self.entities, list) or not self.entities
            else [e for e in self.entities if e not in PII_ENTITIES]
        )
        if bad:
            raise _problem(
                w, "entities", f"{bad} must be a non-empty list of {', '.join(PII_ENTITIES)}"
            )

    def _check_scored(self, w: str) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
            raise _problem(w, "threshold", f"must be a number in [0, 1], got {t!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise _problem(w, "every", f"must be a positive integer, got {self.every!r}")

    def _check_classifier(self, w: str) -> None:
        self._check_scored(w)
        from llmos.engine.guard_match import CLASSIFIERS

        self.model = self.model or "injection-baseline"
        if self.model not in CLASSIFIERS:
            raise _problem(w, "model", f"must be one of {sorted(CLASSIFIERS)}, got {self.model!r}")

    def _check_judge(self, w: str) -> None:
        self._check_scored(w)
        if not isinstance(self.question, str) or not self.question.strip():
            raise _problem(w, "question", "must be a yes/no question, e.g. 'Is this text rude?'")

    def _check_python(self, w: str) -> None:
        self._check_scored(w)
        if callable(self.function):
            return
        if not isinstance(self.function, str) or ":" not in self.function:
            raise _problem(w, "function", "must be a callable or 'module:attribute'")
        module, _, attr = self.function.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise _problem(w, "function", f"cannot load {self.function!r}: {exc}") from None
        if not callable(fn):
            raise _problem(w, "function", f"{self.function!r} is not callable")
        self.function = fn

    # -- derived ----------------------------------------------------------------------------
    @property
    def preventable(self) -> bool:
        """A block that the grammar engine can enforce: the model never emits it."""
        return (
            self.prevent
            and self.action == "block"
            and self.stage == "output"
            and self.kind in ("literal", "regex", "canary")
            and (self.kind != "canary" or self.value is not None)
        )

    def regex_source(self) -> str | None:
        """The guard as one regex (literal, canary, regex kinds), else None."""
        if self.kind == "regex":
            return self.pattern
        if self.kind in ("literal", "canary") and self.value:
            body = "|".join(re.escape(v) for v in sorted(self.value, key=len, reverse=True))
            return f"(?i:{body})" if self.ignore_case else f"(?:{body})"
        return None

    def with_canary(self, system_prompt: str) -> Guard | None:
        """A canary guard bound to the markers in `system_prompt`; None if it has none."""
        if self.kind != "canary" or self.value is not None:
            return self
        found = CANARY_IN_PROMPT.findall(system_prompt or "")
        if not found:
            return None
        return Guard(**{**self.to_dict(), "value": found}, where=self.where)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "where"}
        if callable(out["function"]):
            fn = out["function"]
            out["function"] = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__name__', '?')}"
        return out


def parse_guards(data: object, where: str = "guards") -> list[Guard]:
    """A list of guard dicts (or Guards) → Guards; errors name `guards[i].field`."""
    if data is None:
        return []
    if not isinstance(data, list | tuple):
        raise RequestError(f"{where} must be a list of guard objects", param=where)
    out: list[Guard] = []
    known = {f.name for f in fields(Guard)} - {"where"}
    for i, item in enumerate(data):
        here = f"{where}[{i}]"
        if isinstance(item, Guard):
            out.append(item)
            continue
        if not isinstance(item, Mapping):
            raise RequestError(f"{here} must be an object, got {item!r}", param=here)
        unknown = sorted(set(item) - known)
        if unknown:
            raise RequestError(
                f"{here}.{unknown[0]}: unknown field (unknown: {unknown}); known: {sorted(known)}",
                param=f"{here}.{unknown[0]}",
            )
        if "name" not in item:
            raise _problem(here, "name", "is required")
        out.append(Guard(**dict(item), where=here))
    names = [g.name for g in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise RequestError(f"{where}: two guards are named {dup!r}", param=where)
    return out


def at_stage(guards: list[Guard], stage: str) -> list[Guard]:
    return [g for g in guards if g.stage == stage]
