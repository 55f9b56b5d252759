"""Assertions: each type checks its own configuration when the suite loads (a `SuiteError`
naming the field) and grades one output into (passed, score, reason). `not-` inverts any of
them; `threshold` turns a score into a verdict; `weight` weighs it in the test's score."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Grade = tuple[bool, float, str]
Judge = Callable[[str, str], Awaitable[str]]  # (provider id, prompt) -> the judge's reply


@dataclass(slots=True)
class Context:
    """What an assertion may read besides the output."""

    vars: dict[str, Any]
    base: Path  # the suite's folder: python files are found next to it
    judge: Judge | None = None


def _err(a: Any, message: str) -> Exception:
    from llmos.evals.suite import SuiteError

    return SuiteError(f"{a.where}: {message}")


def _need_value(a: Any) -> None:
    if a.value is None:
        raise _err(a, f"{a.type} needs a value")


def _need_number(a: Any) -> None:
    value = a.value if a.value is not None else a.threshold
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _err(a, f"{a.type} needs a number as value or threshold, got {value!r}")


def _nothing(a: Any) -> None:
    return None


def _texts(a: Any) -> list[str]:
    return [str(v) for v in a.value] if isinstance(a.value, list) else [str(a.value)]


def _value(a: Any, ctx: Context) -> str:
    """A value may use the test's vars, as promptfoo's do: `{{answer}}`."""
    from llmos.evals.providers import render

    return render(str(a.value), ctx.vars)


def equals(a: Any, out: Any, ctx: Context) -> Grade:
    if isinstance(a.value, dict | list):
        try:
            ok = json.loads(out.text) == a.value
        except json.JSONDecodeError:
            ok = False
        return ok, float(ok), "equal as JSON" if ok else "not the expected JSON"
    want = _value(a, ctx)
    ok = out.text.strip() == want.strip()
    return ok, float(ok), f"{'equals' if ok else 'does not equal'} {want!r}"


def contains(a: Any, out: Any, ctx: Context, fold: bool = False) -> Grade:
    want = _value(a, ctx)
    hay, needle = (out.text.lower(), want.lower()) if fold else (out.text, want)
    ok = needle in hay
    return ok, float(ok), f"{'contains' if ok else 'does not contain'} {want!r}"


def contains_many(a: Any, out: Any, ctx: Context, every: bool, fold: bool = False) -> Grade:
    hay = out.text.lower() if fold else out.text
    found = [t for t in _texts(a) if (t.lower() if fold else t) in hay]
    ok = len(found) == len(_texts(a)) if every else bool(found)
    return ok, len(found) / max(1, len(_texts(a))), f"found {found} of {_texts(a)}"


def regex(a: Any, out: Any, ctx: Context) -> Grade:
    ok = re.search(str(a.value), out.text) is not None
    return ok, float(ok), f"{'matches' if ok else 'does not match'} /{a.value}/"


def check_regex(a: Any) -> None:
    _need_value(a)
    try:
        re.compile(str(a.value))
    except re.error as exc:
        raise _err(a, f"not a valid regex: {exc}") from None


def starts_with(a: Any, out: Any, ctx: Context) -> Grade:
    want = _value(a, ctx)
    ok = out.text.lstrip().startswith(want)
    return ok, float(ok), f"{'starts' if ok else 'does not start'} with {want!r}"


def _json_of(text: str) -> Any:
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    return json.loads(fenced.group(1) if fenced else text)


def is_json(a: Any, out: Any, ctx: Context) -> Grade:
    try:
        data = _json_of(out.text)
    except json.JSONDecodeError as exc:
        return False, 0.0, f"not JSON: {exc}"
    if a.value is None:
        return True, 1.0, "valid JSON"
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(a.value).iter_errors(data), key=str)
    if errors:
        path = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
        return False, 0.0, f"JSON fails the schema at {path}: {errors[0].message}"
    return True, 1.0, "valid JSON matching the schema"


def check_schema(a: Any) -> None:
    if a.type == "json-schema":
        _need_value(a)
    if a.value is None:
        return
    if not isinstance(a.value, dict):
        raise _err(a, "the schema is a mapping")
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(a.value)
    except jsonschema.SchemaError as exc:
        raise _err(a, f"not a valid JSON schema: {exc.message}") from None


def numeric(a: Any, out: Any, ctx: Context) -> Grade:
    spec = a.value if isinstance(a.value, dict) else {"expected": a.value}
    # the last number, as GSM8K-style graders read an answer ("12 + 30 = 42")
    found = re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", out.text.replace(",", ""))
    if not found:
        return False, 0.0, "no number in the output"
    got, want = float(found[-1]), float(spec["expected"])
    tol = float(spec.get("tolerance", 0.0))
    ok = abs(got - want) <= tol + 1e-12
    return ok, float(ok), f"{got:g} is {'within' if ok else 'not within'} {tol:g} of {want:g}"


def check_numeric(a: Any) -> None:
    spec = a.value if isinstance(a.value, dict) else {"expected": a.value}
    if set(spec) - {"expected", "tolerance"} or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in spec.values()
    ) or "expected" not in spec:  # fmt: skip
        raise _err(a, "numeric's value is a number or {expected: N, tolerance: T}")


def _python_fn(a: Any, base: Path) -> Callable[..., Any]:
    ref = str(a.value).removeprefix("file://")
    file, _, name = ref.partition(":")
    path = (base / file).resolve()
    spec = importlib.util.spec_from_file_location(f"llmos_eval_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise _err(a, f"python file {file!r} does not exist next to the suite")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name or "get_assert", None)
    if not callable(fn):
        raise _err(a, f"{file} defines no function {name or 'get_assert'!r}")
    return fn


def python(a: Any, out: Any, ctx: Context) -> Grade:
    context = {"vars": ctx.vars, "output": out.as_dict()}
    if str(a.value).startswith("file://"):
        value = _python_fn(a, ctx.base)(out.text, context)
    else:  # an expression over `output` and `context`, as promptfoo's inline python
        value = eval(
            str(a.value), {"json": json, "re": re}, {"output": out.text, "context": context}
        )  # noqa: E501, S307
    if isinstance(value, dict):
        score = float(value.get("score", float(bool(value.get("pass")))))
        return bool(value.get("pass", score > 0)), score, str(value.get("reason", ""))
    if isinstance(value, bool):
        return value, float(value), f"python returned {value}"
    if isinstance(value, int | float):
        ok = value >= (a.threshold if a.threshold is not None else 0.5)
        return ok, float(value), f"python scored {value:g}"
    raise _err(a, f"the python check returned {type(value).__name__}; use bool, float or dict")


# -- similarity: BM25 or term-count cosine (lexical), with the method named ---------------------
# No embedding method: the engine returns no hidden states and the server has no
# /v1/embeddings, and a made-up vector would be worse than an honest lexical score.
def _terms(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25(query: list[str], doc: list[str], corpus: list[list[str]], k1: float = 1.5,
         b: float = 0.75) -> float:  # fmt: skip
    n = len(corpus)
    avg = sum(map(len, corpus)) / max(1, n)
    tf = Counter(doc)
    score = 0.0
    for term in set(query):
        df = sum(term in d for d in corpus)
        idf = math.log((n - df + 0.5) / (df + 0.5) + 1.0)
        f = tf[term]
        score += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(doc) / max(1e-9, avg)))
    return score


def similarity(method: str, reference: str, text: str) -> float:
    """In [0, 1]: BM25 of the output against the reference, over the reference's own score;
    or the cosine of term counts."""
    ref, got = _terms(reference), _terms(text)
    if not ref or not got:
        return 0.0
    if method == "bm25":
        corpus = [ref, got]
        return min(1.0, bm25(ref, got, corpus) / max(1e-9, bm25(ref, ref, corpus)))
    a, b = Counter(ref), Counter(got)
    dot = sum(a[t] * b[t] for t in a)
    return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))


SIMILAR_METHODS = ("bm25", "cosine")


def similar(a: Any, out: Any, ctx: Context) -> Grade:
    method = a.method or "bm25"
    refs = _texts(a)
    score = max(similarity(method, render_ref, out.text) for render_ref in refs)
    threshold = a.threshold if a.threshold is not None else 0.75
    return score >= threshold, score, f"{method} similarity {score:.3f} (threshold {threshold})"


def check_similar(a: Any) -> None:
    _need_value(a)
    if (a.method or "bm25") not in SIMILAR_METHODS:
        raise _err(
            a,
            f"similar's method must be one of {list(SIMILAR_METHODS)} (lexical: llmos's engine "
            f"and server expose no embeddings, so no embedding method), got {a.method!r}",
        )


# -- llm-rubric: a judge model through any backend ---------------------------------------------
RUBRIC = (
    "You grade an answer against a rubric.\n\nRubric: {rubric}\n\nAnswer: {output}\n\n"
    "Does the answer satisfy the rubric? Reply PASS or FAIL."
)


async def llm_rubric(a: Any, out: Any, ctx: Context) -> Grade:
    assert ctx.judge is not None, "the runner gives every context a judge"
    rubric = _value(a, ctx)
    reply = await ctx.judge(
        a.provider or "local:smollm2-135m", RUBRIC.format(rubric=rubric, output=out.text)
    )  # noqa: E501
    verdict = re.search(r"\b(PASS|FAIL)\b", reply.upper())
    ok = verdict is not None and verdict.group(1) == "PASS"
    return ok, float(ok), f"judge said {reply.strip()[:80]!r}"


# -- on programs: the transcript and the meter ---------------------------------------------------
def tool_called(a: Any, out: Any, ctx: Context) -> Grade:
    spec = a.value if isinstance(a.value, dict) else {"name": a.value}
    want_args = spec.get("arguments") or {}
    for call in out.tool_calls:
        if call["name"] != spec["name"]:
            continue
        if all(call["arguments"].get(k) == v for k, v in want_args.items()):
            return True, 1.0, f"called {call['name']}({json.dumps(call['arguments'])})"
    made = [f"{c['name']}({json.dumps(c['arguments'])})" for c in out.tool_calls]
    return False, 0.0, f"no call to {spec['name']} with {want_args}; calls: {made}"


def check_tool(a: Any) -> None:
    spec = a.value if isinstance(a.value, dict) else {"name": a.value}
    if not isinstance(spec.get("name"), str) or set(spec) - {"name", "arguments"}:
        raise _err(a, "tool-called's value is a tool name or {name, arguments: {...}}")


def _limit(a: Any) -> float:
    return float(a.value if a.value is not None else a.threshold)


def max_steps(a: Any, out: Any, ctx: Context) -> Grade:
    ok = out.steps <= _limit(a)
    return ok, float(ok), f"{out.steps} model turns (at most {_limit(a):g})"


def max_cost(a: Any, out: Any, ctx: Context) -> Grade:
    ok = out.cost <= _limit(a)
    return ok, float(ok), f"cost ${out.cost:.6f} (at most ${_limit(a):g})"


def latency(a: Any, out: Any, ctx: Context) -> Grade:
    ms = out.latency_s * 1e3  # promptfoo's latency threshold is in milliseconds
    ok = ms <= _limit(a)
    return ok, float(ok), f"{ms:.0f} ms (at most {_limit(a):g} ms)"


@dataclass(slots=True, frozen=True)
class Type:
    grade: Callable[..., Any]  # (assertion, output, context) -> Grade, or an awaitable of one
    check: Callable[[Any], None] = _nothing


TYPES: dict[str, Type] = {
    "equals": Type(equals, _need_value),
    "contains": Type(contains, _need_value),
    "icontains": Type(lambda a, o, c: contains(a, o, c, fold=True), _need_value),
    "contains-any": Type(lambda a, o, c: contains_many(a, o, c, every=False), _need_value),
    "contains-all": Type(lambda a, o, c: contains_many(a, o, c, every=True), _need_value),
    "icontains-any": Type(lambda a, o, c: contains_many(a, o, c, False, True), _need_value),
    "icontains-all": Type(lambda a, o, c: contains_many(a, o, c, True, True), _need_value),
    "regex": Type(regex, check_regex),
    "starts-with": Type(starts_with, _need_value),
    "is-json": Type(is_json, check_schema),
    "json-schema": Type(is_json, check_schema),
    "numeric": Type(numeric, check_numeric),
    "python": Type(python, _need_value),
    "similar": Type(similar, check_similar),
    "llm-rubric": Type(llm_rubric, _need_value),
    "tool-called": Type(tool_called, check_tool),
    "max-steps": Type(max_steps, _need_number),
    "max-cost": Type(max_cost, _need_number),
    "cost": Type(max_cost, _need_number),
    "latency": Type(latency, _need_number),
}


async def grade(a: Any, out: Any, ctx: Context) -> dict[str, Any]:
    """One assertion's verdict in the report's shape: {type, passed, score, reason}."""
    if out.error is not None and a.type not in ("max-cost", "cost", "latency", "max-steps"):
        passed, score, reason = False, 0.0, f"no output: {out.error}"
    else:
        try:
            value = TYPES[a.type].grade(a, out, ctx)
            passed, score, reason = await value if hasattr(value, "__await__") else value
        except Exception as exc:  # noqa: BLE001 - a user's python check, a judge's failure
            from llmos.evals.suite import SuiteError

            if isinstance(exc, SuiteError):
                raise
            passed, score, reason = False, 0.0, f"{type(exc).__name__}: {exc}"
        if a.threshold is not None and a.type in ("python", "llm-rubric"):
            passed = score >= a.threshold
    if a.negate:
        passed, score, reason = not passed, 1.0 - score, f"not: {reason}"
    name = ("not-" if a.negate else "") + a.type
    return {"type": name, "passed": bool(passed), "score": float(score), "reason": reason,
            "weight": a.weight}  # fmt: skip


def verdict(results: list[dict[str, Any]], threshold: float | None) -> tuple[bool, float]:
    """A test passes when every weighted assertion does, or, with a test threshold, when the
    weighted mean score reaches it (promptfoo's rule)."""
    weighted = [r for r in results if r["weight"] > 0]
    total = sum(r["weight"] for r in weighted)
    score = sum(r["weight"] * r["score"] for r in weighted) / total if total else 1.0
    if threshold is not None:
        return score >= threshold, score
    return all(r["passed"] for r in weighted), score
