"""`LLM`: the offline, vLLM-shaped entry point. `from llmos import LLM, SamplingParams`."""

from __future__ import annotations

import sys
from collections.abc import Sequence as Seq
from itertools import count
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from llmos.engine.config import EngineConfig
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import RequestOutput
from llmos.engine.tool_calls import prepare_chat
from llmos.errors import RequestError
from llmos.models.messages import ROLES
from llmos.models.registry import DEFAULT_MODEL
from llmos.models.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """Generate from many prompts at once, continuously batched over a paged KV cache."""

    def __init__(
        self, model: str = DEFAULT_MODEL, deterministic: bool = False, **engine_options: Any
    ) -> None:
        self.engine = LLMEngine(
            EngineConfig(model=model, deterministic=deterministic, **engine_options)
        )
        self._ids = count()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_progress: bool | None = None,
    ) -> list[RequestOutput]:
        """Outputs come back in prompt order. A bare string or id list is one prompt."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise RequestError(
                    f"params: got {len(params_list)} SamplingParams for {len(prompts)} prompts",
                    param="params",
                )
        return self._run(prompts, params_list, use_progress)

    def chat(
        self,
        messages: Seq[dict[str, Any]] | Seq[Seq[dict[str, Any]]],
        params: SamplingParams | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] = "auto",
        parallel_tool_calls: bool = True,
        add_generation_prompt: bool = True,
        use_progress: bool | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations.

        `tools` and `tool_choice` are OpenAI's. A completion that calls tools has `tool_calls`
        set, `text` holding only its content ("" for a pure call) and finish_reason
        "tool_calls"; the grammar makes every call valid against its function's schema."""
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = []
        calls = None
        for conv in conversations:
            _check_messages(conv)  # type: ignore[arg-type]
            rendered, kwargs, calls = prepare_chat(
                self.tokenizer,
                list(conv),  # type: ignore[arg-type]
                tools,
                tool_choice,
                parallel_tool_calls,
            )
            prompts.append(
                self.tokenizer.encode_chat(
                    rendered,
                    add_generation_prompt=add_generation_prompt,
                    **{**kwargs, **template_kwargs},
                )
            )
        if calls is not None:
            params = calls.constrain(params or SamplingParams())
        outputs = self.generate(prompts, params, use_progress=use_progress)
        for out in outputs if calls is not None else ():
            for completion in out.outputs:
                calls.finish(completion)  # type: ignore[union-attr]
        return outputs

    def _run(
        self, prompts: list[Prompt], params: list[SamplingParams], use_progress: bool | None
    ) -> list[RequestOutput]:
        engine = self.engine
        order: dict[str, int] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                rid = f"llm-{next(self._ids)}"
                engine.add_request(rid, prompt, p)
                order[rid] = i
        except Exception:
            for rid in order:
                engine.abort_request(rid)
            raise
        results: list[RequestOutput | None] = [None] * len(prompts)
        show = (
            use_progress if use_progress is not None else (len(prompts) > 1 and sys.stderr.isatty())
        )
        with Progress(
            TextColumn("generating"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            transient=True,
            disable=not show,
        ) as progress:
            task = progress.add_task("generate", total=len(prompts))
            try:
                while any(r is None for r in results):
                    for out in engine.step():
                        if out.finished:
                            results[order[out.request_id]] = out
                            progress.advance(task)
            except BaseException:
                for rid in order:
                    engine.abort_request(rid)
                raise
        return results  # type: ignore[return-value]


def _check_messages(messages: Seq[dict[str, Any]]) -> None:
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise RequestError(
                f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]"
            )
        if m["role"] not in ROLES:
            raise RequestError(
                f"messages[{i}].role: unknown role {m['role']!r}; expected one of {list(ROLES)}",
                param=f"messages[{i}].role",
            )
        calls = m.get("tool_calls")
        if calls is not None and (
            m["role"] != "assistant"
            or not isinstance(calls, list)
            or not all(
                isinstance(c, dict)
                and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str)
                for c in calls
            )
        ):
            raise RequestError(
                f"messages[{i}].tool_calls: only assistant messages have them, as "
                "a list of {'id', 'type', 'function': {'name', 'arguments'}}",
                param=f"messages[{i}].tool_calls",
            )
        if m.get("content") is None and not (m["role"] == "assistant" and calls):
            raise RequestError(
                f"messages[{i}].content is missing (only an assistant message "
                "with tool_calls may leave it out)",
                param=f"messages[{i}].content",
            )
