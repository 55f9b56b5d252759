"""Grammar-constrained decoding: JSON schemas, regexes, Lark grammars and choices, via llguidance.

Why llguidance: it builds a token mask for our 49k vocabulary in about 0.1 ms per sequence
without compiling an automaton over the whole vocabulary first, its Lark dialect embeds JSON
schemas (`%json {...}`, which the tool-call grammar needs), and it refuses the schema keywords
it cannot enforce rather than ignoring them, so an unsupported schema becomes a `RequestError`
that names the keyword instead of silently unconstrained output.

Each constrained sequence owns an `LLMatcher` that follows its generated tokens (a preempted
sequence keeps its matcher, and recompute does not re-sample, so the state stays true). Per
step, the runner computes the masks of the constrained rows on a background thread while the
model runs, and folds them into the sampler's `banned` mask: one vectorized masked fill over the
batch. A batch with no constrained row does no mask work at all.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import llguidance
import numpy as np
import torch

from llmos.engine.closing import (
    LIMIT,
    NEAR,
    BudgetMatcher,
    ClosingVocab,
    all_required,
    complete,
    json_blocks,
)
from llmos.engine.guard_grammar import GuardedMatcher, block_matcher
from llmos.engine.sampling import SamplingParams
from llmos.errors import RequestError
from llmos.models.tokenizer import Tokenizer

# Compact JSON with one space after ',' and ':' (as most JSON in training data is written): no
# room for runaway whitespace, which small models otherwise fall into.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NUMBER_STEP, NUMBER_LIMIT = 1e-9, 10**16 - 1  # see `tighten`
_SUBSCHEMA = (
    "items",
    "additionalProperties",
    "not",
    "contains",
    "propertyNames",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
    "additionalItems",
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")


# -- grammars ----------------------------------------------------------------------------------
def tighten(schema: Any) -> Any:
    """Narrow a schema to a subset of its instances that a small model cannot run away in:

    - objects that list `properties` but say nothing of others admit no others (as XGrammar's
      strict mode does in vLLM), so the model cannot wander off into invented keys; left open
      are `allOf` branches (closing them could contradict each other) and objects that combine
      `properties` with `$ref`, `*Of` or `patternProperties`;
    - numbers have at most 16 integer digits unless the schema bounds them, and at most 9
      decimals (no exponent) unless it sets `multipleOf` (llama.cpp's grammars cap digits too),
      so neither `1111111...` nor `1.000000...` can fill max_tokens.

    Every output stays valid against the schema as sent."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {k: tighten(v) for k, v in out[key].items()}
    for key in ("items", "additionalProperties"):
        if key in out:
            out[key] = tighten(out[key])
    for key in ("anyOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [tighten(v) for v in out[key]]
    open_keys = (
        "additionalProperties",
        "patternProperties",
        "unevaluatedProperties",
        "allOf",
        "anyOf",
        "oneOf",
        "$ref",
    )
    if "properties" in out and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    if "number" in types or "integer" in types:
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = NUMBER_LIMIT
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -NUMBER_LIMIT
    if "number" in types and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_STEP
    return out


def styled_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as llmos enforces it: closed objects, our JSON layout (a schema's own
    `x-guidance` options win)."""
    closed = tighten(schema)
    return {
        "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})},
        **{k: v for k, v in closed.items() if k != "x-guidance"},
    }


@lru_cache(maxsize=512)
def _compile(kind: str, source: str) -> tuple[str, str | None]:
    """(llguidance grammar, error or None). Cached: tool and response schemas repeat."""
    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(source)
        elif kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(source)
        else:
            raise AssertionError(kind)
    except ValueError as exc:
        return "", str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return grammar, (messages[0] if is_error else None)


def json_schema_grammar(schema: dict[str, Any], param: str) -> str:
    """A checked llguidance grammar for the schema; unsupported keywords raise, named."""
    if not isinstance(schema, dict):
        raise RequestError(f"{param} must be a JSON object", param=param)
    grammar, error = _compile("json_schema", json.dumps(styled_schema(schema)))
    if error is not None:
        raise schema_error(error, schema, param)
    return grammar


def checked_grammar(kind: str, source: str, param: str) -> str:
    grammar, error = _compile(kind, source)
    if error is not None:
        raise RequestError(f"{param}: llguidance cannot use it: {error.strip()}", param=param)
    return grammar


def choice_lark(choices: list[str]) -> str:
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def grammar_of(params: SamplingParams) -> tuple[str, str] | None:
    """(llguidance grammar, the field it came from) for a constrained request, else None."""
    if params.json_schema is not None:
        return json_schema_grammar(params.json_schema, "json_schema"), "json_schema"  # type: ignore[arg-type]
    if params.json_object:
        return json_schema_grammar({"type": "object"}, "json_object"), "json_object"
    if params.regex is not None:
        return checked_grammar("regex", params.regex, "regex"), "regex"
    if params.grammar is not None:
        return checked_grammar("lark", params.grammar, "grammar"), "grammar"
    if params.choice is not None:
        return checked_grammar("lark", choice_lark(params.choice), "choice"), "choice"
    return None


# -- naming what llguidance refused --------------------------------------------------------------
def _walk(schema: Any, path: str = "") -> list[tuple[str, str, Any]]:
    """(path of the holding schema, keyword, value) for every keyword of every subschema."""
    if not isinstance(schema, dict):
        return []
    out = [(path, k, v) for k, v in schema.items()]
    for key, value in schema.items():
        here = f"{path}.{key}" if path else key
        if key in _SUBSCHEMA:
            out += _walk(value, here)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                out += _walk(sub, f"{here}.{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                out += _walk(sub, f"{here}[{i}]")
    return out


def schema_error(error: str, schema: dict[str, Any], param: str) -> RequestError:
    """Name the offending keyword and where it sits: `param` becomes `<param>.<path>.<keyword>`."""
    unimplemented = re.search(r"Unimplemented keys: \[([^\]]*)\]", error)
    wanted = re.findall(r'"([^"]+)"', unimplemented.group(1)) if unimplemented else []
    if error.startswith("Unknown format"):
        wanted = ["format"]
    entries = _walk(schema)
    error = error.replace("min/maxProperties", "minProperties/maxProperties")
    hit = next(((p, k) for k in wanted for p, k2, _ in entries if k2 == k), None)
    if hit is None:  # otherwise the first keyword that the message names
        hit = next(
            ((p, k) for p, k, _ in entries if re.search(rf"(?<![\w$]){re.escape(k)}(?!\w)", error)),
            None,
        )
    if hit is None:
        hit = next(
            ((p, k) for p, k, v in entries if k == "pattern" and isinstance(v, str) and v in error),
            None,
        )
    detail = " ".join(error.split())[:300]
    if hit is None:
        return RequestError(f"{param}: this schema cannot be enforced: {detail}", param=param)
    path, keyword = hit
    where = f" (at {path})" if path else ""
    return RequestError(
        f"{param}: the keyword '{keyword}'{where} cannot be enforced by "
        f"structured output ({detail}); see README 'Structured output' for the "
        "supported subset",
        param=".".join(p for p in (param, path, keyword) if p),
    )


# -- per engine: matchers ------------------------------------------------------------------------
class GrammarCompiler:
    """Turns a request's constraint into one matcher per sequence. Built once per engine; the
    llguidance tokenizer (about 0.6 s) is built on the first constrained request."""

    PROTOTYPES = 64  # matchers kept, fresh, per grammar: a copy costs ~0.1 ms, a build ~10 ms

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        # grammar → an unused matcher, copied for each request (an agent's turns, and many
        # processes in one workspace, repeat their tool grammar; building one is the cost), and
        # its closing plan from the start (None where the search found none) and its reach
        self._prototypes: OrderedDict[str, tuple[llguidance.LLMatcher, list[int] | None, int]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    @cached_property
    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.LLTokenizer(
            self.tokenizer.hf.to_str(),
            n_vocab=self.vocab_size,
            eos_token=list(self.tokenizer.eos_token_ids),
        )

    @cached_property
    def closing_vocab(self) -> ClosingVocab:
        texts = [self.tokenizer.decode([i]) for i in range(self.vocab_size)]
        return ClosingVocab.build(texts, self.tokenizer.eos_token_ids[0], self.tokenizer)

    def matchers(self, params: SamplingParams, max_tokens: int | None = None) -> list[Any] | None:
        """`params.n` fresh matchers, or None for an unconstrained request. Given the request's
        `max_tokens`, each keeps its output inside it (`BudgetMatcher`), and a grammar whose
        shortest completion found does not fit is refused, naming max_tokens. `block` output
        guards add their own matcher to each (`GuardedMatcher`): the model cannot emit them."""
        inner = self._matchers(params, max_tokens)
        blocks = [block_matcher(self.llg_tokenizer, params.guards) for _ in range(params.n)]
        if blocks[0] is None:
            return inner
        inner = inner or [None] * params.n
        eos = self.tokenizer.eos_token_ids
        return [GuardedMatcher(m, b, eos) for m, b in zip(inner, blocks, strict=True)]

    def _matchers(
        self, params: SamplingParams, max_tokens: int | None = None
    ) -> list[llguidance.LLMatcher | BudgetMatcher] | None:
        found = grammar_of(params)
        if found is None:
            return None
        grammar, param = found
        with self._lock:
            entry = self._prototypes.get(grammar)
            if entry is not None:
                self._prototypes.move_to_end(grammar)
        if entry is None:
            proto = llguidance.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
            if proto.is_error():
                raise RequestError(
                    f"{param}: llguidance cannot use it: {proto.get_error().strip()}", param=param
                )
            plan = complete(proto.deep_copy(), self.closing_vocab, LIMIT)
            entry = (proto, plan, self._lazy_reach(grammar, params))
            with self._lock:
                self._prototypes[grammar] = entry
                while len(self._prototypes) > self.PROTOTYPES:
                    self._prototypes.popitem(last=False)
        proto, plan, reach = entry
        if max_tokens is None:
            return [proto.deep_copy() for _ in range(params.n)]
        if plan is not None and len(plan) > max_tokens:
            raise RequestError(
                f"max_tokens is {max_tokens}, but the {param} constraint needs at least "
                f"{len(plan)} tokens to complete; raise max_tokens to {len(plan)} or more",
                param="max_tokens",
            )
        vocab = self.closing_vocab
        return [
            BudgetMatcher(proto.deep_copy(), vocab, max_tokens, plan, reach)
            for _ in range(params.n)
        ]

    def _lazy_reach(self, grammar: str, params: SamplingParams) -> Callable[[], int]:
        """`_reach`, computed on first use (by the sequence that gets near its end first) and
        kept for every later request with this grammar."""
        box: list[int] = []

        def reach() -> int:
            if not box:
                box.append(self._reach(params))
            return box[0]

        return reach

    def _reach(self, params: SamplingParams) -> int:
        """How many tokens one sampled token may add to the shortest completion: that of the
        schema (or of the largest embedded in a Lark grammar, a tool call's) with all its
        parts required; `NEAR` where there is no schema or no completion was found."""
        if params.json_schema is not None:
            given = params.json_schema
            schemas = [json.loads(given) if isinstance(given, str) else given]
        elif params.grammar is not None:
            schemas = json_blocks(params.grammar)
        else:
            return 0 if params.regex is not None or params.choice is not None else NEAR
        best = 0
        for schema in schemas:
            if params.json_schema is not None and all_required(schema) == schema:
                continue  # nothing optional to open: no jump
            grammar, error = _compile(
                "json_schema", json.dumps(styled_schema(all_required(schema)))
            )
            m = None if error else llguidance.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
            plan = None if m is None or m.is_error() else complete(m, self.closing_vocab, LIMIT)
            if plan is None:
                return NEAR
            best = max(best, len(plan))
        return best if schemas else NEAR


# -- per runner: masks ---------------------------------------------------------------------------
class MaskBuilder:
    """Computes the constrained rows' masks off the engine thread, while the model runs."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32

    @cached_property
    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix="llmos-masks")

    @cached_property
    def _executor(self) -> llguidance.LLExecutor:
        return llguidance.LLExecutor(2)

    def start(
        self, matchers: list[llguidance.LLMatcher | BudgetMatcher | None]
    ) -> Future[Masks] | None:
        """Begin the masks of a step's rows (None where unconstrained); None if no row is."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        return self._pool.submit(self._fill, rows, len(matchers))

    def _fill(
        self, rows: list[tuple[llguidance.LLMatcher | BudgetMatcher, int]], batch: int
    ) -> Masks:
        # near its max_tokens a row's closing plan is brought up to date here, off the engine
        # thread; those rows are narrowed once the logits are known (`banned`). A guarded row's
        # block guards are a second mask, intersected with its grammar's
        steered, plain, blocks = [], [], []
        for m, i in rows:
            if isinstance(m, GuardedMatcher):
                if m.block is not None:
                    (blocks if m.inner is not None else plain).append((m.block, i))
                m = m.inner
                if m is None:
                    continue
            if isinstance(m, BudgetMatcher):
                if m.steer():
                    steered.append((m, i))
                m = m.inner
            plain.append((m, i))
        bits = torch.full((batch, self.words), -1, dtype=torch.int32)  # unconstrained: all allowed
        self._executor.unsafe_compute_mask_ptr(plain, bits.data_ptr(), self.words * 4, batch)
        if blocks:
            extra = torch.full((batch, self.words), -1, dtype=torch.int32)
            self._executor.unsafe_compute_mask_ptr(blocks, extra.data_ptr(), self.words * 4, batch)
            bits &= extra
        return Masks(bits, steered)

    def banned(
        self,
        job: Future[Masks],
        eos: tuple[int, ...],
        device: torch.device,
        logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, V] bool: the tokens each row's grammar forbids now (given the step's logits [B, V],
        rows near their max_tokens may pick only from their likely tokens that still close)."""
        masks = job.result()
        bits = masks.bits.numpy().view(np.uint8)
        allowed = np.unpackbits(bits, axis=1, bitorder="little")[:, : self.vocab_size]
        banned = torch.from_numpy(allowed == 0)  # [B, V]
        dead = banned.all(-1)  # a matcher in error allows nothing: let EOS end it
        if bool(dead.any()) and eos:
            banned[dead.nonzero().flatten().unsqueeze(1), torch.tensor(list(eos))] = False
        for m, i in masks.steered:
            row = None if logits is None else logits[i].cpu()
            keep = m.narrow(row, ~banned[i])
            banned[i] = True
            banned[i, keep] = False
        return banned.to(device)


@dataclass(slots=True)
class Masks:
    bits: torch.Tensor  # [B, words] int32: llguidance's allowed-token bitmasks
    steered: list[tuple[BudgetMatcher, int]]  # rows near their max_tokens, to narrow
