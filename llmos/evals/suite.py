"""A suite as data: promptfoo's `prompts`, `providers`, `tests` (`vars`, `assert`), and
`defaultTest`, plus llmos's `matrix:` and `gates:`. JSONL or YAML cases come from
`file://` paths next to the suite, or inline. Every mistake is a `SuiteError` that names the
field, and the command exits 2 on one."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


def _engine_keys() -> set[str]:
    """The engine options `LLM(model, **engine_options)` takes that a configuration may set:
    every field of the engine's config, so a new flag (speculative decoding's, say) can be
    crossed in a matrix the day it lands. The model is the provider's; the seed is --seed."""
    from llmos.engine.config import EngineConfig

    return {f.name for f in fields(EngineConfig)} - {"model", "seed", "user_weights"}


ENGINE_KEYS = _engine_keys()
PROGRAM_KEYS = {"version", "typed_args", "tool_choice", "answer_turn", "max_steps", "model"}
SUITE_KEYS = {
    "description", "name", "prompts", "providers", "tests", "defaultTest", "matrix", "gates",
    "outputPath", "sharing", "env", "evaluateOptions", "metadata",
}  # fmt: skip
TEST_KEYS = {
    "id", "description", "vars", "assert", "options", "threshold", "files", "choices",
    "answer", "metadata",
}  # fmt: skip
GATE_KEYS = {"pass_rate", "pass_k", "test_pass_k", "max_cost", "max_latency_p95", "max_latency_p50"}
MATRIX_KEYS = {"providers", "prompts", "sampling", "engine"}


class SuiteError(ValueError):
    """A suite that cannot run as written (exit code 2)."""


def sampling_keys() -> set[str]:
    from llmos import SamplingParams

    return {f.name for f in fields(SamplingParams)}


@dataclass(slots=True)
class Assertion:
    type: str  # without `not-`
    negate: bool = False
    value: Any = None
    threshold: float | None = None
    weight: float = 1.0
    provider: str | None = None  # llm-rubric's judge
    method: str | None = None  # similar's method
    where: str = ""  # for error messages: tests[3].assert[1]


@dataclass(slots=True)
class Prompt:
    id: str
    label: str
    template: str | list[dict[str, Any]]  # a text, or chat messages with templated content


@dataclass(slots=True)
class Case:
    id: str
    description: str
    vars: dict[str, Any]
    asserts: list[Assertion]
    options: dict[str, Any] = field(default_factory=dict)  # sampling for this test
    threshold: float | None = None
    files: dict[str, str] = field(default_factory=dict)  # a program's workspace
    choices: list[str] | None = None  # multiple choice: scored by log-likelihood
    answer: int | None = None  # the right choice's index


@dataclass(slots=True)
class Cell:
    """One configuration of the matrix: a provider, its prompt, engine flags and sampling."""

    id: str
    label: str
    provider: str  # "local:MODEL", "openai_http:MODEL@URL", "program:FILE"
    kind: str  # local | openai_http | program
    model: str
    prompt: Prompt
    url: str | None = None
    program: str | None = None  # a program file (kind "program")
    engine: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    program_options: dict[str, Any] = field(default_factory=dict)
    mode: str = "chat"  # chat | completion

    @property
    def config(self) -> dict[str, Any]:
        return {
            "provider": self.provider, "prompt": self.prompt.id, "mode": self.mode,
            **self.engine, **self.sampling, **self.program_options,
        }  # fmt: skip

    @property
    def engine_key(self) -> tuple[str, str]:
        """Cells with equal keys share one loaded engine (their sampling may differ)."""
        return (self.model, json.dumps(self.engine, sort_keys=True))


@dataclass(slots=True)
class Suite:
    name: str
    path: str
    hash: str
    base: Path
    prompts: list[Prompt]
    cells: list[Cell]
    cases: list[Case]
    gates: dict[str, Any]


def _file(base: Path, ref: str, where: str) -> Path:
    path = (base / ref.removeprefix("file://")).resolve()
    if not path.is_file():
        raise SuiteError(f"{where}: file {ref!r} does not exist (relative to {base})")
    return path


def _prompts(raw: Any, base: Path) -> list[Prompt]:
    if raw is None:
        return [Prompt("prompt-1", "{{prompt}}", "{{prompt}}")]
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise SuiteError("prompts: a list of prompt texts, file:// paths or {id, raw} entries")
    out = []
    for i, p in enumerate(raw):
        where = f"prompts[{i}]"
        pid, label = f"prompt-{i + 1}", None
        if isinstance(p, dict):
            unknown = set(p) - {"id", "label", "raw"}
            if unknown or "raw" not in p and "id" not in p:
                raise SuiteError(f"{where}: expected {{id, label, raw}}, got keys {sorted(p)}")
            pid, label = str(p.get("id", pid)), p.get("label")
            p = p.get("raw", p.get("id"))
        if not isinstance(p, str):
            raise SuiteError(f"{where}: a prompt is a text, got {type(p).__name__}")
        if p.startswith("file://"):
            text = _file(base, p, where).read_text()
            pid = pid if label else Path(p).stem
            p = text
        template: str | list[dict[str, Any]] = p
        stripped = p.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:  # promptfoo's chat format: a JSON list of messages
                msgs = json.loads(stripped)
                if isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs):
                    template = msgs
            except json.JSONDecodeError:
                pass
        out.append(Prompt(pid, label or (p if len(p) <= 40 else p[:37] + "..."), template))
    return out


def _assertion(raw: Any, where: str) -> Assertion:
    from llmos.evals.assertions import TYPES

    if not isinstance(raw, dict) or "type" not in raw:
        raise SuiteError(f"{where}: an assertion is a mapping with a type, got {raw!r}")
    unknown = set(raw) - {"type", "value", "threshold", "weight", "provider", "method", "metric"}
    if unknown:
        raise SuiteError(f"{where}: unknown field(s) {sorted(unknown)}")
    kind = str(raw["type"])
    negate = kind.startswith("not-")
    base = kind.removeprefix("not-")
    if base not in TYPES:
        raise SuiteError(f"{where}.type: unknown assertion {kind!r}; known: {sorted(TYPES)}")
    for key in ("threshold", "weight"):
        if key in raw and not isinstance(raw[key], int | float):
            raise SuiteError(f"{where}.{key}: a number, got {raw[key]!r}")
    a = Assertion(
        base, negate, raw.get("value"), raw.get("threshold"), float(raw.get("weight", 1.0)),
        raw.get("provider"), raw.get("method"), where,
    )  # fmt: skip
    TYPES[base].check(a)
    return a


def _check_sampling(options: Any, where: str) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise SuiteError(f"{where}: a mapping of sampling settings")
    unknown = set(options) - sampling_keys()
    if unknown:
        raise SuiteError(f"{where}: unknown sampling setting(s) {sorted(unknown)}")
    return dict(options)


def _load_cases(raw: Any, base: Path) -> list[dict[str, Any]]:
    if raw is None:
        return [{}]
    items = raw if isinstance(raw, list) else [raw]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item.startswith("file://"):
            path = _file(base, item, f"tests[{i}]")
            if path.suffix == ".jsonl":
                for n, line in enumerate(path.read_text().splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SuiteError(f"{path.name}:{n}: not valid JSON: {exc}") from None
                    if not isinstance(row, dict):
                        raise SuiteError(f"{path.name}:{n}: a test is a JSON object")
                    out.append(row if set(row) & {"vars", "assert"} else {"vars": row})
            else:
                loaded = yaml.safe_load(path.read_text())
                out.extend(loaded if isinstance(loaded, list) else [loaded])
        elif isinstance(item, dict):
            out.append(item)
        else:
            raise SuiteError(f"tests[{i}]: a test mapping or a file:// path, got {item!r}")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "test"


def _cases(raw: Any, default: Any, base: Path) -> list[Case]:
    default = default or {}
    if not isinstance(default, dict):
        raise SuiteError("defaultTest: a mapping with vars, assert, options")
    d_asserts = [
        _assertion(a, f"defaultTest.assert[{j}]") for j, a in enumerate(default.get("assert") or [])
    ]  # noqa: E501
    d_options = _check_sampling(default.get("options"), "defaultTest.options")
    cases, seen = [], set()
    for i, t in enumerate(_load_cases(raw, base)):
        where = f"tests[{i}]"
        if not isinstance(t, dict):
            raise SuiteError(f"{where}: a test is a mapping")
        unknown = set(t) - TEST_KEYS
        if unknown:
            raise SuiteError(
                f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(TEST_KEYS)}"
            )  # noqa: E501
        vars_ = {**(default.get("vars") or {}), **(t.get("vars") or {})}
        asserts = d_asserts + [
            _assertion(a, f"{where}.assert[{j}]") for j, a in enumerate(t.get("assert") or [])
        ]  # noqa: E501
        choices = t.get("choices")
        answer = t.get("answer")
        if choices is not None:
            if not isinstance(choices, list) or len(choices) < 2:
                raise SuiteError(f"{where}.choices: a list of at least two texts")
            choices = [str(c) for c in choices]
            if isinstance(answer, str):
                if answer not in choices:
                    raise SuiteError(f"{where}.answer: {answer!r} is not one of the choices")
                answer = choices.index(answer)
            if answer is not None and not (isinstance(answer, int) and 0 <= answer < len(choices)):
                raise SuiteError(f"{where}.answer: a choice or its index, got {answer!r}")
            if answer is not None:
                asserts.append(Assertion("equals", value=choices[answer], where=f"{where}.answer"))
        files = t.get("files") or {}
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise SuiteError(f"{where}.files: a mapping of file path to text")
        desc = str(t.get("description") or "")
        tid = str(t.get("id") or (_slug(desc) if desc else f"test-{i + 1}"))
        n, base_id = 2, tid
        while tid in seen:
            tid, n = f"{base_id}-{n}", n + 1
        seen.add(tid)
        cases.append(Case(
            tid, desc or tid, vars_, asserts,
            {**d_options, **_check_sampling(t.get("options"), f"{where}.options")},
            t.get("threshold"), files, choices, answer,
        ))  # fmt: skip
    if not cases:
        raise SuiteError("tests: the suite has no tests")
    return cases


def _provider(raw: Any, where: str, base: Path) -> tuple[str, str | None, dict[str, Any]]:
    if isinstance(raw, str):
        return raw, None, {}
    if isinstance(raw, dict) and "id" in raw:
        unknown = set(raw) - {"id", "label", "config"}
        if unknown:
            raise SuiteError(f"{where}: unknown field(s) {sorted(unknown)}")
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            raise SuiteError(f"{where}.config: a mapping")
        return str(raw["id"]), raw.get("label"), dict(config)
    raise SuiteError(f"{where}: a provider id like 'local:smollm2-135m' or {{id, label, config}}")


def _cell(pid: str, label: str | None, config: dict[str, Any], prompt: Prompt, where: str,
          base: Path) -> Cell:  # fmt: skip
    config = dict(config)
    mode = config.pop("mode", "chat")
    if mode not in ("chat", "completion"):
        raise SuiteError(f"{where}.config.mode: 'chat' or 'completion', got {mode!r}")
    url = None
    program = None
    if pid.startswith("local:") or pid == "local":
        kind, model = "local", pid.partition(":")[2] or "smollm2-135m"
    elif pid.startswith("openai_http:"):
        kind = "openai_http"
        model, _, url = pid.removeprefix("openai_http:").rpartition("@")
        if not model or not url.startswith("http"):
            raise SuiteError(f"{where}: expected openai_http:MODEL@URL, got {pid!r}")
    elif pid.startswith("openai:"):  # promptfoo's openai:chat:MODEL, pointed at a base URL
        kind = "openai_http"
        model = pid.split(":")[-1]
        url = config.pop("apiBaseUrl", None) or config.pop("base_url", None)
        if not url:
            import os

            url = os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise SuiteError(
                f"{where}.config.apiBaseUrl: {pid} needs a base URL (or OPENAI_BASE_URL)"
            )  # noqa: E501
    elif pid.startswith("program:"):
        kind = "program"
        program = str(_file(base, pid.removeprefix("program:"), where))
        model = str(config.pop("model", "smollm2-135m")).removeprefix("local:")
    else:
        raise SuiteError(
            f"{where}: unknown provider {pid!r}; use local:MODEL, openai_http:MODEL@URL, "
            "openai:chat:MODEL (with config.apiBaseUrl) or program:FILE"
        )
    engine = {k: config.pop(k) for k in list(config) if k in ENGINE_KEYS}
    if engine and kind == "openai_http":
        raise SuiteError(
            f"{where}.config: engine flags {sorted(engine)} apply only to local models"
        )
    prog = {k: config.pop(k) for k in list(config) if k in PROGRAM_KEYS and kind == "program"}
    sampling = _check_sampling(config, f"{where}.config")
    return Cell(
        "", label or pid, pid, kind, model, prompt, url, program, engine, sampling, prog, mode
    )


def _gates(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SuiteError("gates: a mapping like {pass_rate: 0.8, max_cost: 0.01}")
    unknown = set(raw) - GATE_KEYS
    if unknown:
        raise SuiteError(f"gates: unknown gate(s) {sorted(unknown)}; known: {sorted(GATE_KEYS)}")
    for key, value in raw.items():
        if key == "test_pass_k":
            if not isinstance(value, dict):
                raise SuiteError("gates.test_pass_k: a mapping of test id to a minimum pass^k")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise SuiteError(f"gates.{key}: a number, got {value!r}")
    return dict(raw)


def load_suite(path: str | Path, overrides: dict[str, Any] | None = None) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite is a mapping (prompts, providers, tests, ...)")
    data.update(overrides or {})
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise SuiteError(
            f"unknown top-level field(s) {sorted(unknown)}; known: {sorted(SUITE_KEYS)}"
        )  # noqa: E501
    base = path.resolve().parent
    prompts = _prompts(data.get("prompts"), base)
    cases = _cases(data.get("tests"), data.get("defaultTest"), base)
    matrix = data.get("matrix") or {}
    if not isinstance(matrix, dict) or set(matrix) - MATRIX_KEYS:
        raise SuiteError(f"matrix: a mapping of {sorted(MATRIX_KEYS)} to lists")
    for key, axis in matrix.items():
        if not isinstance(axis, list) or not axis:
            raise SuiteError(f"matrix.{key}: a non-empty list")
    providers = matrix.get("providers") or data.get("providers")
    if isinstance(providers, str):
        providers = [providers]
    if not providers:
        raise SuiteError("providers: the suite names no provider (e.g. local:smollm2-135m)")
    if matrix.get("prompts"):
        ids = {p.id: p for p in prompts}
        missing = [p for p in matrix["prompts"] if p not in ids]
        if missing:
            raise SuiteError(f"matrix.prompts: unknown prompt id(s) {missing}; known: {list(ids)}")
        prompts = [ids[p] for p in matrix["prompts"]]
    engines = matrix.get("engine") or [{}]
    samplings = matrix.get("sampling") or [{}]
    for j, e in enumerate(engines):
        if not isinstance(e, dict) or set(e) - ENGINE_KEYS:
            raise SuiteError(f"matrix.engine[{j}]: a mapping of engine flags {sorted(ENGINE_KEYS)}")
    for j, s in enumerate(samplings):
        _check_sampling(s, f"matrix.sampling[{j}]")
    cells: list[Cell] = []
    for i, raw in enumerate(providers):
        where = f"providers[{i}]"
        pid, label, config = _provider(raw, where, base)
        is_http = pid.startswith(("openai_http:", "openai:"))
        for prompt, engine, sampling in itertools.product(
            prompts, [{}] if is_http else engines, samplings
        ):  # noqa: E501
            cell = _cell(pid, label, {**config, **engine, **sampling}, prompt, where, base)
            parts = [cell.label]
            if len(prompts) > 1:
                parts.append(prompt.id)
            parts += [f"{k}={v}" for k, v in {**engine, **sampling}.items()]
            cell.label = " ".join(str(p) for p in parts)
            cells.append(cell)
    for n, cell in enumerate(cells):
        cell.id = f"c{n + 1}-{_slug(cell.label)[:40]}"
    digest = hashlib.sha256(text.encode())
    for case in cases:  # the cases from JSONL files count too
        digest.update(
            json.dumps(
                [case.id, case.vars, case.files, case.choices], sort_keys=True, default=str
            ).encode()
        )  # noqa: E501
    return Suite(
        str(data.get("name") or data.get("description") or path.stem), str(path),
        digest.hexdigest()[:16], base, prompts, cells, cases, _gates(data.get("gates")),
    )  # fmt: skip
