"""Where a case runs: the local engine (chat, completion, or log-likelihood of choices), any
OpenAI-compatible URL, or a kernel program run end to end in a fresh workspace.

Local configurations with the same model and engine flags share one loaded engine (an
`Engines` pool), and every case of theirs is in flight at once, so the engine's continuous
batching runs them together; their sampling settings may differ per request."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from llmos.backends.base import ChatRequest, ChatResult, Usage
from llmos.evals.suite import Case, Cell, SuiteError
from llmos.kernel.meter import DEFAULT_PRICES

_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
EVAL_ENGINE = {"kv_cache_memory": "512MiB"}  # an eval's default engine: smaller than serving's


def render(template: str, vars: dict[str, Any]) -> str:
    try:
        return _JINJA.from_string(template).render(**vars)
    except jinja2.UndefinedError as exc:
        raise SuiteError(f"prompt: {exc.message} (add it to the test's vars)") from None
    except jinja2.TemplateSyntaxError as exc:
        raise SuiteError(f"prompt: template syntax error: {exc.message}") from None


def messages_for(cell: Cell, case: Case) -> list[dict[str, Any]]:
    t = cell.prompt.template
    if isinstance(t, str):
        return [{"role": "user", "content": render(t, case.vars)}]
    return [{**m, "content": render(str(m.get("content", "")), case.vars)} for m in t]


def prompt_text(cell: Cell, case: Case) -> str:
    t = cell.prompt.template
    return render(t, case.vars) if isinstance(t, str) else "\n".join(
        m["content"] for m in messages_for(cell, case)
    )  # fmt: skip


@dataclass(slots=True)
class Output:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_s: float = 0.0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {name, arguments: {...}}
    steps: int = 1  # model turns
    status: str = "done"
    error: str | None = None
    transcript: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def price(kind: str, result: ChatResult) -> float:
    """The kernel meter's price for a call of this backend kind."""
    return DEFAULT_PRICES[kind].cost(result) if kind in DEFAULT_PRICES else 0.0


_HASHES: dict[tuple[str, int, float], str] = {}


def model_hash(model: str) -> str:
    """sha256 of the model file (cached by path, size and mtime), or the name for a remote."""
    from llmos.models.registry import resolve

    try:
        path = resolve(model)
    except Exception:  # noqa: BLE001 - a remote model, a missing file: no hash to give
        return f"unresolved:{model}"
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    key = (str(path), sum(f.stat().st_size for f in files if f.is_file()), path.stat().st_mtime)
    if key not in _HASHES:
        digest = hashlib.sha256()
        for f in files:
            if f.is_file():
                with f.open("rb") as fh:
                    while chunk := fh.read(1 << 22):
                        digest.update(chunk)
        _HASHES[key] = digest.hexdigest()[:16]
    return _HASHES[key]


class Shared:
    """A backend lent to a kernel: closing the kernel leaves it open for the next cell."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def aclose(self) -> None:
        pass


class Engines:
    """One loaded local engine per (model, engine flags); http backends per URL and model."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # the engines' seed, for requests without their own
        self._local: dict[tuple[str, str], Any] = {}
        self._http: dict[tuple[str, str], Any] = {}
        self.judges: set[tuple[str, str]] = set()  # engines a judge uses: kept to the end
        self.closed: list[dict[str, Any]] = []  # each engine's KV blocks when it was let go

    def local(self, model: str, engine: dict[str, Any]) -> Any:
        from llmos.backends.local import LocalBackend

        key = (model, json.dumps(engine, sort_keys=True))
        if key not in self._local:
            try:
                self._local[key] = LocalBackend(
                    model=model, **{**EVAL_ENGINE, "seed": self.seed, **engine}
                )
            except (ValueError, TypeError) as exc:
                raise SuiteError(f"engine flags {engine}: {exc}") from None
        return self._local[key]

    def http(self, model: str, url: str) -> Any:
        from llmos.backends.openai_http import OpenAIHTTPBackend

        key = (model, url)
        if key not in self._http:
            self._http[key] = OpenAIHTTPBackend(url, model)
        return self._http[key]

    def for_cell(self, cell: Cell) -> Any:
        if cell.kind == "openai_http":
            assert cell.url is not None
            return self.http(cell.model, cell.url)
        return self.local(cell.model, cell.engine)

    async def judge(self, provider: str, prompt: str) -> str:
        """llm-rubric's judge: any provider id the suite accepts."""
        sampling: dict[str, Any] = {"temperature": 0.0, "max_tokens": 8}
        if provider.startswith("openai_http:"):
            model, _, url = provider.removeprefix("openai_http:").rpartition("@")
            backend = self.http(model, url)
        elif provider.startswith("local"):
            model = provider.partition(":")[2] or "smollm2-135m"
            self.judges.add((model, "{}"))
            backend = self.local(model, {})
            sampling["choice"] = ["PASS", "FAIL"]  # the grammar: a verdict and nothing else
        else:
            raise SuiteError(
                f"llm-rubric provider: local:MODEL or openai_http:MODEL@URL, got {provider!r}"
            )  # noqa: E501
        result = await backend.chat(
            ChatRequest([{"role": "user", "content": prompt}], sampling=sampling)
        )  # noqa: E501
        return result.content or ""

    async def close(self, keep: set[tuple[str, str]] | None = None) -> None:
        for key in list(self._local):
            if keep is None or key not in keep:
                backend = self._local.pop(key)
                stats = backend.engine.stats()
                self.closed.append({
                    "model": key[0], "flags": json.loads(key[1]),
                    "kv_blocks_used": stats.kv_blocks_used,
                    "kv_blocks_orphaned": stats.kv_blocks_orphaned,
                })  # fmt: skip
                await backend.aclose()
        if keep is None:
            for backend in self._http.values():
                await backend.aclose()
            self._http.clear()


def _sampling(cell: Cell, case: Case, repeat: int) -> dict[str, Any]:
    sampling = {**cell.sampling, **case.options}
    if sampling.get("seed") is not None:  # a repeat is a fresh sample, also under a seed
        sampling["seed"] = int(sampling["seed"]) + repeat
    return sampling


async def run_chat(backend: Any, cell: Cell, case: Case, repeat: int) -> Output:
    request = ChatRequest(messages_for(cell, case), sampling=_sampling(cell, case, repeat))
    start = time.perf_counter()
    result = await backend.chat(request)
    elapsed = time.perf_counter() - start
    calls = [{"name": c.name, "arguments": _args(c.arguments)} for c in result.tool_calls]
    return Output(
        result.content or "", result.usage.prompt_tokens, result.usage.completion_tokens,
        price(backend.kind, result), elapsed, calls,
    )  # fmt: skip


async def run_completion(backend: Any, cell: Cell, case: Case, repeat: int) -> Output:
    from llmos import SamplingParams

    tok = backend.engine.tokenizer
    params = SamplingParams(
        **{"temperature": 0.0, "max_tokens": 256, **_sampling(cell, case, repeat)}
    )  # noqa: E501
    start = time.perf_counter()
    final = None
    async for out in backend.engine.generate(tok.encode(prompt_text(cell, case)), params):
        final = out
    assert final is not None
    elapsed = time.perf_counter() - start
    usage = Usage(len(final.prompt_token_ids), final.num_cached_tokens, len(final.token_ids))
    result = ChatResult(final.text, [], usage, final.metrics.get("engine_seconds", 0.0))
    return Output(final.text, usage.prompt_tokens, usage.completion_tokens,
                  price("local", result), elapsed)  # fmt: skip


def _args(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_value": value}


def load_program(cell: Cell) -> Any:
    from llmos.kernel import Program, ProgramError

    assert cell.program is not None
    try:
        # a copy: a .py program file's module (and its `program`) is loaded once per process,
        # so one cell's options must not reach another cell's program
        program = copy.deepcopy(Program.load(cell.program))
    except ProgramError as exc:
        raise SuiteError(f"{cell.provider}: {exc}") from None
    opts = dict(cell.program_options)
    if "max_steps" in opts:
        program.limits.max_steps = int(opts.pop("max_steps"))
    for key, value in opts.items():
        setattr(program, key, value)
    program.sampling = {**program.sampling, **cell.sampling}
    return program


async def run_program(kernel: Any, cell: Cell, case: Case, repeat: int, root: Path) -> Output:
    """The program as a process in a fresh workspace holding the test's files."""
    from llmos.kernel.process import ModelTurn, ToolCallStep

    program = load_program(cell)
    sampling = _sampling(cell, case, repeat)
    program.sampling = {**program.sampling, **sampling}
    ws = root / cell.id / case.id / str(repeat)
    ws.mkdir(parents=True, exist_ok=True)
    for rel, text in case.files.items():
        path = (ws / rel).resolve()
        if not path.is_relative_to(ws.resolve()):
            raise SuiteError(f"tests {case.id}.files: {rel!r} leaves the workspace")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    start = time.perf_counter()
    pid = kernel.spawn(program, prompt_text(cell, case), user="eval", workspace=ws)
    p = await asyncio.to_thread(kernel.wait, pid, 1800)
    elapsed = time.perf_counter() - start
    calls = [
        {"name": s.name, "arguments": _args(s.arguments)}
        for s in p.steps
        if isinstance(s, ToolCallStep)
    ]  # noqa: E501
    transcript = [
        {"kind": s.kind, **{k: str(v)[:300] for k, v in asdict(s).items()}} for s in p.steps
    ]  # noqa: E501
    status = p.status.value
    return Output(
        p.answer or "", p.usage.prompt_tokens, p.usage.completion_tokens, p.usage.cost, elapsed,
        calls, sum(isinstance(s, ModelTurn) for s in p.steps), status,
        None if status == "done" or p.answer else f"{status}: {p.reason}", transcript,
    )  # fmt: skip
