"""`Sequence`: the engine's unit of work, and what a request's outputs look like."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

from llmos.engine.sampling import SamplingParams
from llmos.models.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from llmos.engine.output import OutputFilter


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_FILTERED = "content_filter"  # an output filter stopped it (engine/output.py)

    @property
    def finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), best first


_ids = count()


class Sequence:
    """One stream of tokens: a prompt and what has been generated after it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        *,
        index: int = 0,
        priority: int = 0,
        user: str | None = None,
        max_tokens: int,
        retain: str | None = None,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n outputs
        self.token_ids = list(prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # resolved against the context length
        self.priority = priority
        self.user = user
        self.retain = retain  # pin key: keep this conversation's blocks when it finishes
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.engine_seconds = 0.0  # its share of the engine steps that advanced it
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of full blocks (prefix cache)
        self.num_named_blocks = 0  # leading blocks already registered in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.detokenizer = detokenizer
        self.text = ""
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # prompt tokens 1.. scored by the positions before them (the request's first output
        # only: its n outputs share one prompt); filled chunk by chunk during prefill
        self.prompt_logprobs: list[TokenLogprob] | None = (
            [] if params.prompt_logprobs is not None and index == 0 else None
        )
        self._prompt_view: list[dict[int, float] | None] | None = None
        self.bad_words_ids: list[list[int]] = []  # params.bad_words, tokenized by the engine
        self.num_preemptions = 0
        # grammar state for structured output: it follows the generated tokens, so preemption
        # and recompute leave it right
        self.matcher: LLMatcher | None = None
        # text filters after detokenization (the streaming guards' seam: engine/output.py)
        self.output_filters: list[OutputFilter] = []
        self.filtered_chars = 0  # text fed to the filters so far
        self.filter_hold = 0  # of that, characters the filters hold back for now
        # speculation (engine/spec.py): the drafts tried and accepted, per this sequence
        self.spec_k = 0  # its current draft length (0 until the speculator first sets it)
        self.num_drafts = 0  # verification steps that carried drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked for and not all computed: prefill must produce their
        logits, so this sequence cannot take its prompt from the prefix cache."""
        return (
            self.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.num_prompt_tokens - 1
        )

    def prompt_logprobs_view(self) -> list[dict[int, float] | None] | None:
        """vLLM's shape: None for the first token, then per prompt token a dict of token id →
        logprob holding that token first and then the top k. None until all are computed."""
        if self.prompt_logprobs is None or self.needs_prompt_logprobs:
            return None
        if self._prompt_view is None:
            out: list[dict[int, float] | None] = [None]
            for e in self.prompt_logprobs:
                entry = {e.token_id: e.logprob}
                entry.update((tid, lp) for tid, lp in e.top if tid not in entry)
                out.append(entry)
            self._prompt_view = out
        return self._prompt_view

    def banned_bad_words(self) -> list[int]:
        """The last token of every bad word whose other tokens the output now ends with."""
        out = self.output_token_ids
        banned = []
        for word in self.bad_words_ids:
            head = word[:-1]
            if len(head) <= len(out) and (not head or out[len(out) - len(head) :] == head):
                banned.append(word[-1])
        return banned

    def stop_tokens(self, eos: tuple[int, ...]) -> tuple[int, ...]:
        """The tokens that end this sequence when sampled: EOS (unless `ignore_eos`) and
        `stop_token_ids`. The one place that says so, for the sampler and the stop check."""
        ids = (
            self.params.stop_token_ids
            if self.params.ignore_eos
            else (*eos, *self.params.stop_token_ids)
        )
        return tuple(dict.fromkeys(ids))

    def banned_stop_tokens(self, eos: tuple[int, ...]) -> tuple[int, ...]:
        """The stop tokens the sampler must not pick now: all of them until `min_tokens` are
        out. A grammar, where there is one, decides instead when the sequence may end."""
        if self.num_output_tokens >= self.params.min_tokens or self.matcher is not None:
            return ()
        return self.stop_tokens(eos)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def stop_hold(self) -> int:
        """Characters at the end of the text that may yet begin a stop string."""
        stops = self.params.stop
        if self.status.finished or not stops:
            return 0
        return max(len(s) for s in stops) - 1

    def visible_text(self) -> str:
        """Text that can be shown now: while running, hold back a possible stop-string prefix
        and whatever the output filters hold (see engine/output.py)."""
        if self.output_filters:
            return self.text[: max(0, self.filtered_chars - self.filter_hold)]
        hold = self.stop_hold()
        return self.text[: max(0, len(self.text) - hold)] if hold else self.text

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, {self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )


@dataclass(slots=True)
class FunctionCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(slots=True)
class ToolCall:
    """One call the model made, shaped like OpenAI's `tool_calls` entries."""

    id: str  # "call_..."
    function: FunctionCall
    type: str = "function"

    @property
    def name(self) -> str:
        return self.function.name

    @property
    def arguments(self) -> dict[str, Any]:
        """The arguments, parsed (the grammar made them valid JSON)."""
        return json.loads(self.function.arguments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.function.name, "arguments": self.function.arguments},
        }


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    # set by chat with tools: the calls parsed from the output (then `text` holds only the
    # answer's content, "" for a pure call, and finish_reason is "tool_calls")
    tool_calls: list[ToolCall] | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # SamplingParams.prompt_logprobs: [None, {token id: logprob, ...}, ...] (vLLM's shape)
    prompt_logprobs: list[dict[int, float] | None] | None = None

    # single-output conveniences, so `llm.generate(...)[0].text` reads naturally
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].logprobs

    @property
    def tool_calls(self) -> list[ToolCall] | None:
        return self.outputs[0].tool_calls
