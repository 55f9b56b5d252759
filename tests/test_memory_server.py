"""Overflow is never silent at the engine and server layers: `LLM.generate` raises
ContextLengthExceeded, `llmos serve` answers 400 context_length_exceeded, and with
`--trim-history` a plain chat client's long history is trimmed to fit and the response's usage
says so (`usage.context_trim`), through the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from llmos import LLM, SamplingParams
from llmos.engine.async_engine import AsyncEngine
from llmos.errors import ContextLengthExceeded
from llmos.server.app import create_app
from llmos.server.launch import serve_in_thread
from llmos.server.state import ServerConfig

WINDOW = 512


@pytest.fixture(scope="module")
def small() -> LLM:
    return LLM(max_model_len=WINDOW, kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def clients(small: LLM) -> Iterator[tuple[OpenAI, OpenAI]]:
    engine = AsyncEngine(small.engine)
    plain = create_app(engine, ServerConfig())
    trimming = create_app(engine, ServerConfig(trim_history=True))
    with serve_in_thread(plain) as a, serve_in_thread(trimming) as b:
        yield tuple(  # type: ignore[misc]
            OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=120) for s in (a, b)
        )


def history(turns: int) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": "You are terse. Reply with one word."}]
    for i in range(turns):
        call = {
            "id": f"c{i}",
            "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"q": str(i)})},
        }
        msgs += [
            {"role": "user", "content": f"Question {i}: " + "tell me about the weather " * 8},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": "sunny and warm " * 20},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    return msgs + [{"role": "user", "content": "Say yes."}]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


def test_llm_generate_raises_rather_than_clamps(small: LLM) -> None:
    with pytest.raises(ContextLengthExceeded) as e:
        small.generate("word " * 1500, SamplingParams(max_tokens=4))
    assert e.value.param == "prompt"
    with pytest.raises(ContextLengthExceeded) as e:  # max_tokens is refused, not clamped
        small.generate("hello", SamplingParams(max_tokens=WINDOW))
    assert e.value.param == "max_tokens"


def test_too_long_history_is_a_400_by_default(clients: tuple[OpenAI, OpenAI]) -> None:
    plain, _ = clients
    with pytest.raises(openai.BadRequestError) as e:
        plain.chat.completions.create(
            model="smollm2-135m", messages=history(12), tools=TOOLS, max_tokens=8
        )
    assert e.value.code == "context_length_exceeded"


def test_trim_history_fits_and_says_so(clients: tuple[OpenAI, OpenAI]) -> None:
    _, trimming = clients
    r = trimming.chat.completions.create(
        model="smollm2-135m", messages=history(12), tools=TOOLS, max_tokens=8, temperature=0
    )
    trim = r.usage.model_extra["context_trim"]
    assert trim["policy"] == "trim" and trim["messages_dropped"] > 0
    assert trim["prompt_tokens_before"] > WINDOW - 8 >= trim["prompt_tokens_after"]
    assert r.usage.prompt_tokens == trim["prompt_tokens_after"]
    short = trimming.chat.completions.create(
        model="smollm2-135m", messages=history(1), max_tokens=4, temperature=0
    )
    assert "context_trim" not in (short.usage.model_extra or {})  # nothing to trim: no field
    chunks = list(
        trimming.chat.completions.create(
            model="smollm2-135m",
            messages=history(12),
            tools=TOOLS,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.model_extra["context_trim"]["messages_dropped"] > 0


def test_trim_history_refuses_what_cannot_fit(clients: tuple[OpenAI, OpenAI]) -> None:
    _, trimming = clients
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x " * 1200}]
    with pytest.raises(openai.BadRequestError) as e:
        trimming.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=8)
    assert e.value.code == "context_length_exceeded" and "trimming" in str(e.value)
