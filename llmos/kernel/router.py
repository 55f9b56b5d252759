"""The cascade: ask the cheapest tier first, check its answer, escalate only when a check fails.

`cascade:[local:smollm2-135m, openai_http:big@URL]` names one. Checks run cheapest first:
deterministic ones (the program's `output_schema`, tool-call arguments against the tool's JSON
schema, the program's own `python` check, a `command` run through the sandbox), then
confidence (the answer tokens' mean probability, where the backend returns log-probs), then an
optional judge model (yes or no, under a grammar, its probability as the score). A tier may be
sampled `samples` times with different seeds before the next tier is asked; with `feedback` the
next ask sees each failed attempt and why it failed.

A cascade is a `Backend`, so the loop does not change: it calls `chat_for(request, proc)` where
a backend has one (the checks read the process's program and workspace), journals the rejected
`attempts` of the result as steps of their own, each metered to the backend that made it, and
records `backend` (the tier that answered) on the accepted step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmos import backends
from llmos.backends.base import Backend, ChatRequest, ChatResult, Message
from llmos.kernel import checks as check_of
from llmos.kernel.checks import CascadeError
from llmos.kernel.tools import Policy

if TYPE_CHECKING:
    from llmos.kernel.process import Process

# What a tier sees after a failed attempt (feedback): the attempt, then this note. The words
# are memory.REPAIR's, so the transcript's projection of the attempts is what the tier saw.
FEEDBACK = (
    "Your last reply could not be used: {why}. Reply again: either only a JSON tool call "
    "object, or your final answer as plain text."
)
JUDGE_PROMPT = (
    "Here is a request and an answer to it.\n\nRequest:\n{task}\n\nAnswer:\n{answer}\n\n"
    "Is the answer correct and complete? Reply yes or no."
)


@dataclass(slots=True)
class CascadeConfig:
    """A program's `cascade:` section (every field optional)."""

    # attempts per tier, each with its own seed, before the next tier; a list: one per tier
    # (its last entry repeating), e.g. [3, 1]: the small model thrice, the big one once
    samples: int | list[int] = 1
    sample_temperature: float = 0.7  # re-samples of a greedy (temperature 0) program use this
    schema: bool = True  # the program's output_schema checks an answer
    tool_args: bool = True  # each tool call's arguments must match its tool's JSON schema
    # "name" of a function in the program's .py file, or "module:function"; f(answer: str |
    # None, tool_calls: list[ToolCall], messages: list[dict]) -> True/None (pass), False or why
    python: str | None = None
    # argv run with run_command in the workspace ("{answer}" in an item becomes the answer);
    # exit code 0 passes
    command: list[str] | None = None
    min_confidence: float | None = None  # the answer tokens' geometric-mean probability, (0, 1)
    judge: str | None = None  # a backend name that answers yes/no on the attempt
    judge_min: float = 0.5  # the judge's probability of "yes" an answer needs
    feedback: bool = True  # later asks see the failed attempts and why they failed

    def __post_init__(self) -> None:
        counts = self.samples if isinstance(self.samples, list) else [self.samples]
        if not counts or not all(isinstance(c, int) and c >= 1 for c in counts):
            raise CascadeError(
                f"cascade.samples must be an integer >= 1 or a list of them, got {self.samples!r}"
            )
        if not 0.0 <= self.sample_temperature <= 2.0:
            raise CascadeError(
                f"cascade.sample_temperature must be in [0, 2], got {self.sample_temperature}"
            )
        if self.min_confidence is not None and not 0.0 < self.min_confidence < 1.0:
            raise CascadeError(
                f"cascade.min_confidence must be in (0, 1), got {self.min_confidence}"
            )
        if not 0.0 <= self.judge_min <= 1.0:
            raise CascadeError(f"cascade.judge_min must be in [0, 1], got {self.judge_min}")
        if self.command is not None and (
            not isinstance(self.command, list)
            or not self.command
            or not all(isinstance(a, str) for a in self.command)
        ):
            raise CascadeError(f"cascade.command must be a list of strings, got {self.command!r}")
        if self.python is not None and not isinstance(self.python, str):
            raise CascadeError(f"cascade.python must be a function's name, got {self.python!r}")

    def samples_for(self, tier: int) -> int:
        if isinstance(self.samples, int):
            return self.samples
        return self.samples[min(tier, len(self.samples) - 1)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CascadeConfig:
        if not isinstance(data, dict):
            raise CascadeError(f"cascade must be a mapping of settings, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CascadeError(f"cascade: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(slots=True)
class Attempt:
    """A tier's answer that a check rejected: its own step, metered to its own backend
    (`result.backend`, the tier's name or, for a pool tier, its member's)."""

    result: ChatResult
    reason: str  # which check failed, and why


@dataclass(slots=True)
class CascadeResult(ChatResult):
    attempts: list[Attempt] = field(default_factory=list)  # rejected, in order
    judged: list[ChatResult] = field(default_factory=list)  # the judge's calls, each metered


@dataclass(slots=True, frozen=True)
class Member:
    """What the meter asks of a tier that answered (see Meter.price_for)."""

    kind: str
    price: dict[str, float] | None = None


@dataclass(slots=True)
class Checks:
    """What one call is checked against: the settings, and the process they belong to."""

    config: CascadeConfig
    output_schema: dict[str, Any] | None = None
    workspace: str | None = None
    policy: Policy | None = None
    source: str | None = None  # the program's .py file (where a bare `python` name lives)
    judged: list[ChatResult] = field(default_factory=list)  # the judge's verdicts, to meter


class Cascade:
    kind = "cascade"

    def __init__(
        self,
        tiers: list[Backend],
        config: CascadeConfig | None = None,
        judge: Backend | None = None,
        *,
        owns: bool = True,
    ) -> None:
        if not tiers:
            raise CascadeError("cascade: name at least one tier, e.g. cascade:[local, ...]")
        self.tiers = tiers
        self.config = config or CascadeConfig()
        self._judges: dict[str, Backend] = {config.judge: judge} if config and judge else {}
        self._owns = owns
        self.name = "cascade:[" + ", ".join(t.name for t in tiers) + "]"
        windows = [t.context_window for t in tiers if t.context_window]
        self.context_window: int | None = min(windows) if windows else None
        self.enforces_schema = all(getattr(t, "enforces_schema", False) for t in tiers)

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]]) -> int:
        return self.tiers[0].count_tokens(messages, tools)

    async def chat(self, request: ChatRequest) -> CascadeResult:
        return await self.run(request, Checks(self.config))

    async def chat_for(self, request: ChatRequest, proc: Process) -> CascadeResult:
        """The loop's call: the checks read the process's program and workspace."""
        prog = proc.program
        config = CascadeConfig.from_dict(prog.cascade) if prog.cascade else self.config
        return await self.run(
            request,
            Checks(config, prog.output_schema, proc.workspace, prog.policy, prog.source),
        )

    async def run(self, request: ChatRequest, checks: Checks) -> CascadeResult:
        config, attempts = checks.config, []
        messages = list(request.messages)
        result: ChatResult | None = None
        for i, tier in enumerate(self.tiers):
            for k in range(config.samples_for(i)):
                sampling = _sampling(request.sampling, k, config, tier)
                asked = dataclasses.replace(
                    request,
                    messages=messages,
                    sampling=sampling,
                    request_id=f"{request.request_id}-c{len(attempts)}"
                    if request.request_id
                    else None,
                )
                result = await tier.chat(asked)
                result.backend = result.backend or tier.name
                if i == len(self.tiers) - 1 and k == config.samples_for(i) - 1:
                    break  # the last ask: its answer stands whatever a check would say
                reason = await self.check(result, request, checks)
                if reason is None:
                    return _final(result, attempts, checks.judged)
                attempts.append(Attempt(result, reason))
                if config.feedback:
                    messages = [*messages, _assistant(result), _note(reason)]
        # every earlier ask failed its checks: the last tier's last answer stands, unchecked
        # here (the loop's own checks still apply to it)
        assert result is not None
        return _final(result, attempts, checks.judged)

    async def check(self, result: ChatResult, request: ChatRequest, checks: Checks) -> str | None:
        """Why `result` fails, cheapest check first, or None when it passes every one."""
        config = checks.config
        if result.malformed:
            return f"malformed: {result.malformed}"
        if not result.tool_calls and not (result.content or "").strip():
            return "the reply was empty"
        if config.tool_args:
            why = check_of.tool_args(result, request.tools)
            if why:
                return why
        if config.schema and checks.output_schema is not None and not result.tool_calls:
            why = check_of.schema(result.content or "", checks.output_schema)
            if why:
                return why
        if config.python:
            why = check_of.python(config.python, checks.source, result, request.messages)
            if why:
                return why
        if config.command and not result.tool_calls:
            why = await asyncio.to_thread(
                check_of.command, config.command, result, checks.workspace, checks.policy
            )
            if why:
                return why
        if config.min_confidence is not None and result.logprobs:
            confidence = math.exp(sum(result.logprobs) / len(result.logprobs))
            if confidence < config.min_confidence:
                return (
                    f"low confidence: the answer's tokens have mean probability "
                    f"{confidence:.3f}, below {config.min_confidence}"
                )
        if config.judge is not None:
            judge = self._judge_for(config.judge)
            score = await self._judge(judge, result, request, checks.judged)
            if score < config.judge_min:
                return f"the judge rated the answer {score:.2f}, below {config.judge_min}"
        return None

    def _judge_for(self, name: str) -> Backend:
        """The judge backend a config names: a tier of this cascade, or resolved once."""
        if name not in self._judges:
            tier = next((t for t in self.tiers if t.name == name), None)
            self._judges[name] = tier or resolve(name)
        return self._judges[name]

    async def _judge(
        self,
        judge: Backend,
        result: ChatResult,
        request: ChatRequest,
        judged: list[ChatResult] | None = None,
    ) -> float:
        """The judge's probability that `result` is right; its call goes in `judged`, so the
        loop meters it to the process like any other model call."""
        task = next(
            (m.get("content") for m in reversed(request.messages) if m["role"] == "user"), ""
        )
        answer = result.content or json.dumps(
            [{"name": c.name, "arguments": c.arguments} for c in result.tool_calls]
        )
        local = judge.kind == "local"
        sampling: dict[str, Any] = {"temperature": 0.0, "max_tokens": 3}
        if local:  # yes or no under a grammar; the chosen token's probability is the score
            sampling |= {"choice": ["yes", "no"], "logprobs": 0}
        verdict = await judge.chat(
            ChatRequest(
                [{"role": "user", "content": JUDGE_PROMPT.format(task=task, answer=answer)}],
                sampling=sampling,
                priority=request.priority,
                user=request.user,
            )
        )
        verdict.backend = verdict.backend or judge.name
        if judged is not None:
            judged.append(verdict)
        yes = (verdict.content or "").strip().lower().startswith("yes")
        p = math.exp(verdict.logprobs[0]) if verdict.logprobs else 1.0
        return p if yes else 1.0 - p

    def member(self, name: str) -> Member | Any | None:
        """The tier (or a pool tier's member) named `name`, for the meter's price."""
        for tier in [*self.tiers, *self._judges.values()]:
            if tier.name == name:
                return Member(tier.kind, getattr(tier, "price", None))
            inner = getattr(tier, "member", None)
            found = inner(name) if callable(inner) else None
            if found is not None:
                return found
        return None

    def release(self, key: str) -> None:
        for tier in self.tiers:
            tier.release(key)

    async def aclose(self) -> None:
        if self._owns:
            for b in {id(b): b for b in [*self.tiers, *self._judges.values()]}.values():
                await b.aclose()


def _sampling(base: dict[str, Any], k: int, config: CascadeConfig, tier: Backend) -> dict[str, Any]:
    """Attempt k on a tier: the program's sampling first, then other seeds (and, for a greedy
    program, `sample_temperature`, else every re-sample would be the same answer)."""
    sampling = dict(base)
    if k > 0:
        sampling["seed"] = int(sampling.get("seed") or 0) + k
        if not sampling.get("temperature"):
            sampling["temperature"] = config.sample_temperature
    if config.min_confidence is not None and tier.kind == "local":
        sampling.setdefault("logprobs", 0)
    return sampling


def _final(result: ChatResult, attempts: list[Attempt], judged: list[ChatResult]) -> CascadeResult:
    values = {f.name: getattr(result, f.name) for f in dataclasses.fields(ChatResult)}
    return CascadeResult(**values, attempts=attempts, judged=list(judged))


def _assistant(result: ChatResult) -> Message:
    m: Message = {"role": "assistant", "content": result.content, "raw": result.raw}
    if result.content is None:
        m["content"] = result.raw
    return m


def _note(reason: str) -> Message:
    return {"role": "user", "content": FEEDBACK.format(why=reason)}


def split_spec(spec: str) -> list[str]:
    """`[a, pool:[b, c], d]` → ["a", "pool:[b, c]", "d"]: commas at the top level only."""
    inner = spec.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise CascadeError(f"model: a cascade is cascade:[TIER, TIER, ...], got cascade:{spec}")
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(inner[1:-1], start=1):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:-1].strip())
    if depth != 0 or not all(parts):
        raise CascadeError(f"model: cascade:{spec} has an empty tier or unbalanced brackets")
    return parts


def resolve(name: str, config: CascadeConfig | None = None) -> Backend:
    """`backends.resolve`, plus `cascade:[TIER, ...]` (the kernel's names)."""
    if not name.startswith("cascade:"):
        return backends.resolve(name)
    tiers = [resolve(part) for part in split_spec(name.removeprefix("cascade:"))]
    config = config or CascadeConfig()
    judge = resolve(config.judge) if config.judge else None
    return Cascade(tiers, config, judge)
