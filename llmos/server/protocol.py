"""The OpenAI wire format: request and response models for chat, completions and models.

Requests allow extra fields, as OpenAI's own clients send new ones often; vLLM's sampling
extras (`top_k`, `min_p`, `ignore_eos`, `priority`...) are read; the rest are named to the
client and the log, or refused with `strict_fields` (see `fields.py`). Turning a
request into engine terms (`SamplingParams`) happens here, so the routes stay thin.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmos.engine.sampling import SamplingParams
from llmos.engine.structured import grammar_of
from llmos.errors import RequestError
from llmos.server.errors import APIError

_INT64 = 2**63


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data: Any) -> Any:
        """Clients send `null` for fields they leave unset; the field's default applies."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """Fields that chat and completions share: what to sample and when to stop."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=2 * _INT64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = Field(0, ge=-_INT64, lt=_INT64)
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    speculation: bool | None = None  # false: no speculative drafts for this request
    guards: list[dict[str, Any]] | None = None  # llmos safeguards (see llmos/engine/guards.py)
    # vLLM-style structured output
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(SamplingParams fields, their names in this request) of the structured output asked."""
        fields = {
            "json_schema": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        names = {
            "json_schema": "guided_json",
            "regex": "guided_regex",
            "choice": "guided_choice",
            "grammar": "guided_grammar",
        }
        return {k: v for k, v in fields.items() if v is not None}, names

    def check_common(self) -> None:
        """Refuse what the engine cannot honour, rather than silently ignore it."""
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )

    def sampling_params(
        self, *, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """SamplingParams with OpenAI's defaults; it names the field of any bad value."""
        extras: dict[str, Any] = {
            k: v
            for k, v in (
                ("top_k", self.top_k),
                ("min_p", self.min_p),
                ("repetition_penalty", self.repetition_penalty),
                ("prompt_logprobs", prompt_logprobs),
                ("logit_bias", self.logit_bias),  # keys are token ids as strings; checked there
                ("bad_words", self.bad_words),
                ("allowed_token_ids", self.allowed_token_ids),
                ("speculation", self.speculation),
                ("guards", self.guards),  # errors name guards[i].field
            )
            if v is not None
        }
        constraint, names = self.constraint()
        with _renamed(names):
            params = self._sampling_params(max_tokens, logprobs, {**extras, **constraint})
            grammar_of(params)  # compile now (cached for the engine) to name a bad field
        return params

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, extras: dict[str, Any]
    ) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            **extras,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


@contextmanager
def _renamed(names: dict[str, str]) -> Iterator[None]:
    """Re-raise a RequestError about an engine field under the request's own name for it."""
    try:
        yield
    except RequestError as exc:
        head, _, rest = (exc.param or "").partition(".")
        if head not in names:
            raise
        message = str(exc).replace(head, names[head], 1)
        raise APIError(
            400, message, param=names[head] + (f".{rest}" if rest else ""), code=exc.code
        ) from exc


# -- chat --------------------------------------------------------------------------------------
class ContentPart(_Request):
    type: str
    text: str | None = None


class FunctionCallIn(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool turn: which call this answers

    def for_template(self) -> dict[str, Any]:
        """The message as sent; `llmos.models.messages.normalize` (on every path to the chat
        template) maps `developer` to `system` and text parts to text."""
        return self.model_dump(exclude_none=True)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise APIError(
                400,
                f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                param="top_logprobs",
            )
        for i, m in enumerate(self.messages):
            if m.tool_calls and m.role != "assistant":
                raise APIError(
                    400,
                    f"messages[{i}].tool_calls: only assistant messages call tools",
                    param=f"messages[{i}].tool_calls",
                )

    def constraint(self) -> tuple[dict[str, Any], dict[str, str]]:
        """`response_format` (json_object, or json_schema with `strict`) as SamplingParams fields;
        the schema is always enforced, `strict` or not."""
        fields, names = super().constraint()
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if kind == "json_object":
            fields["json_object"] = True
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise APIError(
                    400,
                    "response_format.json_schema must be an object with a 'schema'",
                    param="response_format.json_schema",
                )
            if spec.get("schema") is None:
                fields["json_object"] = True
            else:
                fields["json_schema"] = spec["schema"]
        elif kind != "text":
            raise APIError(
                400,
                f"response_format.type must be 'text', 'json_object' or "
                f"'json_schema', got {kind!r}",
                param="response_format.type",
            )
        if kind != "text" and len(fields) > 1:
            raise APIError(
                400,
                "response_format cannot be combined with guided_* fields",
                param="response_format",
            )
        if kind != "text":
            names = {
                **names,
                "json_schema": "response_format.json_schema.schema",
                "json_object": "response_format",
            }
        return fields, names

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatLogprobTop(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprobToken(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken]
    refusal: None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class Usage(BaseModel):
    # extras (only when the engine speculates): `speculation`, this response's drafts
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


# -- completions -------------------------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # the legacy API's default
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(
                400, "best_of must equal n (or be left out) on this server", param="best_of"
            )

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a batch: one string or token list per prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return list(p)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


# -- models ------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmos"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
