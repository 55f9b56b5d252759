"""`SamplingParams` and the sampler: a ladder of small pure functions over the whole batch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos.engine.guards import parse_guards
from llmos.errors import RequestError

_MASK = float("-inf")
_CONSTRAINTS = ("json_schema", "json_object", "regex", "grammar", "choice")


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. Temperature 0 is greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: the chosen token's plus the top k
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's plus the top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured output (at most one; see llmos/engine/structured.py)
    json_schema: dict[str, Any] | str | None = None  # a JSON schema, or its JSON text
    json_object: bool = False  # any JSON object (OpenAI's response_format json_object)
    regex: str | None = None  # the whole output matches it
    grammar: str | None = None  # a Lark grammar in llguidance's dialect
    choice: list[str] | None = None  # exactly one of these strings
    # token controls, applied before penalties and the grammar (the grammar has the last word)
    logit_bias: dict[int, float] | None = None  # token id → added to its logit, in [-100, 100]
    bad_words: list[str] | None = None  # never complete these words' token sequences
    allowed_token_ids: list[int] | None = None  # sample only among these
    # safeguards (llmos/engine/guards.py): dicts or Guards; output ones are checked as text
    # streams, and block literal/regex ones are also compiled into the decoding constraint
    guards: list[Any] | None = None
    speculation: bool = True  # False: never draft for this request (when the engine speculates)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("n", isinstance(self.n, int) and 1 <= self.n <= 128, "an integer in [1, 128]"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "0, -1 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            (
                "max_tokens",
                self.max_tokens is None
                or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
                "at least 1",
            ),
            ("min_tokens", isinstance(self.min_tokens, int) and self.min_tokens >= 0, "at least 0"),
            (
                "logprobs",
                self.logprobs is None
                or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
                "in [0, 20]",
            ),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None
                or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
                "in [0, 20]",
            ),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("speculation", isinstance(self.speculation, bool), "true or false"),
            ("stop", len(self.stop) <= 16, "at most 16 strings"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise RequestError(
                    f"{name} must be {want}, got {getattr(self, name)!r}", param=name
                )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                param="min_tokens",
            )
        self._check_constraint()
        self._check_token_controls()
        self.guards = parse_guards(self.guards) or None

    def _check_token_controls(self) -> None:
        """Shapes and ranges here; token ids against the vocabulary in the engine."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise RequestError(
                    f"logit_bias must be a map of token id to bias, got {self.logit_bias!r}",
                    param="logit_bias",
                )
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                tid = _token_id(key)
                if tid is None:
                    raise RequestError(
                        f"logit_bias: key {key!r} is not a token id (an integer)",
                        param="logit_bias",
                    )
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                    or not -100 <= value <= 100
                ):
                    raise RequestError(
                        f"logit_bias[{key!r}] must be a number in [-100, 100], got {value!r}",
                        param="logit_bias",
                    )
                bias[tid] = float(value)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if (
                not isinstance(ids, list | tuple)
                or not ids
                or any(isinstance(t, bool) or not isinstance(t, int) for t in ids)
            ):
                raise RequestError(
                    f"allowed_token_ids must be a non-empty list of token ids, got {ids!r}",
                    param="allowed_token_ids",
                )
            self.allowed_token_ids = list(dict.fromkeys(ids))
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, list | tuple) or not all(
                isinstance(w, str) and w.strip() for w in words
            ):
                raise RequestError(
                    f"bad_words must be a list of non-empty strings, got {words!r}",
                    param="bad_words",
                )
            self.bad_words = list(words)

    def token_ids_used(self) -> list[tuple[str, list[int]]]:
        """(field, token ids) of every field that names tokens, for the vocabulary check."""
        return [
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", list(self.logit_bias or ())),
            ("allowed_token_ids", self.allowed_token_ids or []),
        ]

    def _check_constraint(self) -> None:
        """Types and exclusivity here; whether llguidance can enforce it is checked when the
        engine compiles it (add_request)."""
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except json.JSONDecodeError as exc:
                raise RequestError(
                    f"json_schema is not valid JSON: {exc}", param="json_schema"
                ) from exc
        checks = [
            (
                "json_schema",
                self.json_schema is None or isinstance(self.json_schema, dict),
                "a JSON object (dict)",
            ),
            ("json_object", isinstance(self.json_object, bool), "a bool"),
            (
                "regex",
                self.regex is None or (isinstance(self.regex, str) and self.regex != ""),
                "a non-empty string",
            ),
            (
                "grammar",
                self.grammar is None
                or (isinstance(self.grammar, str) and self.grammar.strip() != ""),
                "a non-empty Lark grammar",
            ),
            (
                "choice",
                self.choice is None
                or (
                    isinstance(self.choice, list | tuple)
                    and len(self.choice) > 0
                    and all(isinstance(c, str) and c for c in self.choice)
                ),
                "a non-empty list of non-empty strings",
            ),
        ]
        for name, ok, want in checks:
            if not ok:
                raise RequestError(
                    f"{name} must be {want}, got {getattr(self, name)!r}", param=name
                )
        if self.choice is not None:
            self.choice = list(self.choice)
        used = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(used) > 1:
            raise RequestError(
                f"{used[1]}: at most one of {', '.join(_CONSTRAINTS)} may be set "
                f"(got {' and '.join(used)})",
                param=used[1],
            )

    @property
    def constrained(self) -> bool:
        """Whether decoding follows a grammar (JSON schema, regex, Lark grammar or choice)."""
        return any(getattr(self, name) not in (None, False) for name in _CONSTRAINTS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _token_id(key: object) -> int | None:
    """A logit_bias key as a token id: an int, or (as JSON object keys are) its decimal text."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return None


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling settings of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] (1.0 where greedy)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor | None  # [B] int64 (vocab size where off), None when no row uses it
    top_p: torch.Tensor | None  # [B]
    min_p: torch.Tensor | None  # [B]
    generators: list[torch.Generator | None]  # per row; None: the global RNG
    # penalties (None when no row uses them)
    presence: torch.Tensor | None = None  # [B]
    frequency: torch.Tensor | None = None  # [B]
    repetition: torch.Tensor | None = None  # [B]
    output_counts: torch.Tensor | None = None  # [B, V] float counts of generated tokens
    seen: torch.Tensor | None = None  # [B, V] bool, prompt or generated
    banned: torch.Tensor | None = None  # [B, V] bool: min_tokens' stops, grammar-masked tokens
    # logit_bias as (rows [N], token ids [N], biases [N]); None when no row has one
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def apply_logit_bias(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Add each row's biases to its logits (first, as OpenAI and vLLM do)."""
    if b.bias is None:
        return logits
    rows, ids, values = b.bias
    return logits.index_put((rows, ids), values, accumulate=True)


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.repetition is not None and b.seen is not None:
        rep = b.repetition.unsqueeze(1)  # [B, 1]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(b.seen, penalized, logits)
    if b.output_counts is not None and b.frequency is not None and b.presence is not None:
        logits = logits - b.frequency.unsqueeze(1) * b.output_counts
        logits = logits - b.presence.unsqueeze(1) * (b.output_counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Mask tokens outside each row's top-k / nucleus / min-p set. logits: [B, V], tempered."""
    if b.min_p is not None:
        probs = logits.softmax(-1)
        threshold = probs.amax(-1, keepdim=True) * b.min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, _MASK)
    if b.top_k is None and b.top_p is None:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)  # [B, V]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if b.top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
        drop |= ranks >= b.top_k.unsqueeze(1)
    if b.top_p is not None:
        probs = sorted_logits.masked_fill(drop, _MASK).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly better tokens
        drop |= before >= b.top_p.unsqueeze(1)
    drop[:, 0] = False  # the best token always survives
    return logits.masked_fill(drop.scatter(1, order, drop), _MASK)


def uniform_draws(
    rows: int, generators: list[torch.Generator | None], device: torch.device
) -> torch.Tensor:
    """One U[0, 1) draw per row; a row with its own generator draws from it alone."""
    u = torch.rand(rows, device=device)
    for row, gen in enumerate(generators):
        if gen is not None:
            u[row] = torch.rand(1, generator=gen, device=device)[0]
    return u


def sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logits: [B, V] fp32 → token ids [B]. Greedy rows take the argmax."""
    logits = apply_logit_bias(logits, b)
    if b.banned is not None:
        logits = logits.masked_fill(b.banned, _MASK)
    logits = apply_penalties(logits, b)
    any_greedy = bool(b.greedy.any())
    if any_greedy and bool(b.greedy.all()):
        return logits.argmax(-1)
    logits = apply_top_k_top_p_min_p(logits / b.temperature.unsqueeze(1), b)
    # Inverse CDF: one uniform draw per row (drawing noise for every token of a 49k vocabulary
    # cost more than the forward pass at batch 64). The weights need no normalizing: the draw
    # is scaled by each row's total. `right=True` never lands on a zero-weight (masked) token.
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()
    cdf = weights.cumsum_(-1)
    u = uniform_draws(cdf.shape[0], b.generators, cdf.device)
    target = (u * cdf[:, -1]).unsqueeze(1)
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(1)
    sampled = sampled.clamp_max(cdf.shape[-1] - 1)
    return torch.where(b.greedy, logits.argmax(-1), sampled) if any_greedy else sampled


def logprobs_of(
    logits: torch.Tensor, token_ids: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's own log-probabilities (before sampling settings): chosen [B], top [B, k]."""
    logp = logits.log_softmax(-1)
    chosen = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    if top_k == 0:
        return chosen, logp[:, :0], token_ids[:, None][:, :0]
    top_vals, top_ids = logp.topk(top_k, dim=-1)
    return chosen, top_vals, top_ids
