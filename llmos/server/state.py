"""The server's settings, and the state its routes share: engine, metrics, admission, names."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llmos.engine.async_engine import AsyncEngine
from llmos.engine.guards import parse_guards
from llmos.errors import RequestError
from llmos.models.registry import ALIASES
from llmos.server.drain import InFlight
from llmos.server.errors import APIError
from llmos.server.limits import Admission
from llmos.server.logprobs import TokenTexts
from llmos.server.metrics import Metrics


@dataclass(slots=True)
class ServerConfig:
    served_model_name: str | None = None  # default: the engine's model name
    api_key: str | None = None  # None: no key needed
    max_waiting: int | None = None  # None: no limit on waiting sequences
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompts: int = 64  # prompts in one /v1/completions batch
    strict_fields: bool = False  # refuse (400) a request with fields the server does not read
    responses_db: str = ":memory:"  # SQLite file of stored /v1/responses (`llmos serve`: a file)
    guards: list[Any] = field(default_factory=list)  # every request's (`llmos serve --guards`)
    trim_history: bool = False  # chat history too long for the context is trimmed to fit

    def __post_init__(self) -> None:
        self.guards = parse_guards(self.guards)
        if self.max_waiting is not None and self.max_waiting < 0:
            raise RequestError(
                f"max_waiting must be at least 0, got {self.max_waiting}", param="max_waiting"
            )
        if self.max_body_bytes < 1024:
            raise RequestError(
                f"max_body_bytes must be at least 1024, got {self.max_body_bytes}",
                param="max_body_bytes",
            )
        if self.max_prompts < 1:
            raise RequestError(
                f"max_prompts must be at least 1, got {self.max_prompts}", param="max_prompts"
            )


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    config: ServerConfig
    metrics: Metrics = field(init=False)
    admission: Admission = field(init=False)
    texts: TokenTexts = field(init=False)
    model_name: str = field(init=False)
    longest_token: int = field(init=False)  # characters in the vocabulary's longest token
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    in_flight: InFlight = field(default_factory=InFlight)  # stopped when the grace period ends

    def __post_init__(self) -> None:
        llm = self.engine.engine
        # (engine state is read only through the snapshot the engine thread publishes)
        self.metrics = Metrics(self.engine.stats)
        self.admission = Admission(
            self.config.max_waiting,
            llm.config.max_num_seqs,
            lambda: self.engine.stats().num_requests_waiting,
        )
        self.texts = TokenTexts(llm.tokenizer)
        self.model_name = self.config.served_model_name or llm.model_name
        self.longest_token = max(map(len, llm.tokenizer.hf.get_vocab()), default=1)

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def check_model(self, model: str | None) -> None:
        """404 for a name this server does not serve (its aliases are fine)."""
        if model is None or model == self.model_name or ALIASES.get(model) == self.model_name:
            return
        if model == self.engine.engine.config.model:
            return
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{self.model_name}'",
            param="model",
            code="model_not_found",
        )

    def check_text_fits(self, num_chars: int, param: str) -> None:
        """Refuse text too long for the context without tokenizing it: tokenizing holds the GIL,
        so a huge prompt would stall every stream for seconds only to be refused."""
        at_least = num_chars // self.longest_token
        if at_least > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} "
                f"tokens, but the prompt has at least {at_least} tokens.",
                param=param,
                code="context_length_exceeded",
            )
