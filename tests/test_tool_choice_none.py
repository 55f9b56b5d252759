"""`tool_choice: "none"` with tools present never lets call syntax through, on
/v1/chat/completions through the official `openai` client: the tools stay in the prompt (so the
prefix cache holds whatever the choice), and the grammar admits only an answer without a call or
a look-alike of one (`<tool_call`, `</tool_call`, `<tools>`, `<tool_request>`..., or a call
object's `{"name": ..., "arguments"` head). The conversation begs for a call (the model called a
tool last turn, and the user asks for another), sampling runs at temperature 1 over several
seeds, and the very same prompt without the grammar does write the syntax (measured: 8 of 12).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.engine.tool_calls import prepare_chat
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread

MODEL = "smollm2-135m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
BEG: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
    {"role": "user", "content": "Now call get_weather for Lyon, the same way."},
]
SEEDS = range(6)
CALL_SYNTAX = re.compile(
    r'</?tool(?:[^a-z]|s|call)|\{\s*"name"\s*:\s*"[^"]*"\s*,\s*"arguments"', re.I
)


@pytest.fixture(scope="module")
def client(llm: LLM) -> Iterator[OpenAI]:
    app = create_app(AsyncEngine(llm.engine))
    server: RunningServer
    with (
        serve_in_thread(app) as server,
        OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120) as c,
    ):
        yield c


def _leaks(text: str) -> bool:
    return CALL_SYNTAX.search(text) is not None


def test_without_the_grammar_the_same_prompt_writes_call_syntax(client: OpenAI, llm: LLM) -> None:
    """The control: the prompt "none" renders (tool prompt included), sent with no tools, so
    nothing but the grammar differs."""
    messages, _, _ = prepare_chat(llm.tokenizer, BEG, [WEATHER], "none")
    leaks = 0
    for seed in SEEDS:
        r = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=1.0, seed=seed, n=2, max_tokens=40
        )
        leaks += sum(_leaks(c.message.content or "") for c in r.choices)
    assert leaks >= 3, leaks


def test_auto_either_calls_or_answers_without_call_syntax(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=BEG, tools=[WEATHER], temperature=1.0, seed=0, n=6, max_tokens=40
    )
    assert any(c.message.tool_calls for c in r.choices)
    assert not [c.message.content for c in r.choices if _leaks(c.message.content or "")]


def test_none_never_writes_call_syntax(client: OpenAI) -> None:
    texts = []
    for seed in SEEDS:
        r = client.chat.completions.create(
            model=MODEL,
            messages=BEG,
            tools=[WEATHER],
            tool_choice="none",
            temperature=1.0,
            seed=seed,
            n=2,
            max_tokens=40,
        )
        for choice in r.choices:
            assert choice.message.tool_calls is None
            assert choice.finish_reason in ("stop", "length")
            texts.append(choice.message.content or "")
    assert not [t for t in texts if _leaks(t)], texts
    assert sum(bool(t.strip()) for t in texts) >= len(texts) // 2  # answers, not silence


def test_none_streamed_never_writes_call_syntax(client: OpenAI) -> None:
    for seed in SEEDS[:3]:
        text, finish = "", None
        for chunk in client.chat.completions.create(
            model=MODEL,
            messages=BEG,
            tools=[WEATHER],
            tool_choice="none",
            temperature=1.0,
            seed=seed,
            max_tokens=40,
            stream=True,
        ):
            for choice in chunk.choices:
                assert not choice.delta.tool_calls
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert finish in ("stop", "length") and not _leaks(text), text


def test_none_with_a_json_answer_format_has_no_call_inside(client: OpenAI) -> None:
    """The answer may be JSON (response_format): its strings cannot smuggle a call either."""
    for seed in SEEDS[:3]:
        r = client.chat.completions.create(
            model=MODEL,
            messages=BEG,
            tools=[WEATHER],
            tool_choice="none",
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
            max_tokens=40,
        )
        text = r.choices[0].message.content or ""
        assert r.choices[0].message.tool_calls is None and "<tool_call" not in text, text
