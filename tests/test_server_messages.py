"""Anthropic's Messages API (`/v1/messages`) through the official `anthropic` client, against a
real uvicorn server on a loopback port with the real embedded model and an API key (which the
client sends as `x-api-key`).

This client version no longer takes `temperature`/`top_k` as arguments (Anthropic's newest
models dropped them); they go in `extra_body`, as the wire format still carries them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from anthropic import Anthropic
from openai import OpenAI

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.engine.sequence import CompletionOutput, RequestOutput
from llmos.engine.tool_calls import ChatTools, check_tools
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.messages import Reply
from llmos.server.state import ServerConfig

MODEL = "smollm2-135m"
KEY = "sk-llmos-test"
GREEDY = {"temperature": 0}
ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[RunningServer]:
    app = create_app(AsyncEngine(llm.engine), ServerConfig(api_key=KEY))
    with serve_in_thread(app) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Anthropic]:
    with Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def wait_for_idle(llm: LLM) -> None:
    deadline = time.monotonic() + 30
    while llm.engine.has_unfinished_requests() or llm.engine.blocks.num_used:
        assert time.monotonic() < deadline, "the engine kept requests or KV blocks"
        time.sleep(0.05)


# -- create and stream -------------------------------------------------------------------------
def test_create_is_the_chat_completion_in_anthropic_shape(
    client: Anthropic, server: RunningServer
) -> None:
    system = "You are a geography teacher. Answer in one short sentence."
    r = client.messages.create(
        model=MODEL,
        max_tokens=16,
        system=[{"type": "text", "text": system}],
        messages=ASK,
        metadata={"user_id": "u-1"},
        extra_body=GREEDY,
    )
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.model == MODEL
    (block,) = r.content
    assert block.type == "text" and block.text
    with OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as oai:
        chat = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": system}, *ASK],
            max_tokens=16,
            temperature=0,
        )
    assert block.text == chat.choices[0].message.content
    reason = {"stop": "end_turn", "length": "max_tokens"}[chat.choices[0].finish_reason]
    assert r.stop_reason == reason and r.stop_sequence is None
    usage = r.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == chat.usage.completion_tokens
    # the same prompt again: most of it comes from the prefix cache, and usage says so
    again = client.messages.create(
        model=MODEL,
        max_tokens=16,
        system=[{"type": "text", "text": system}],
        messages=ASK,
        extra_body=GREEDY,
    )
    assert again.content[0].text == block.text  # type: ignore[union-attr]
    assert again.usage.cache_read_input_tokens >= 16
    assert (
        again.usage.input_tokens + again.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    )


def test_stream_text_and_final_message(client: Anthropic) -> None:
    whole = client.messages.create(model=MODEL, max_tokens=24, messages=ASK, extra_body=GREEDY)
    with client.messages.stream(
        model=MODEL, max_tokens=24, messages=ASK, extra_body=GREEDY
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + (
        final.usage.cache_read_input_tokens or 0
    ) == whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0)


def test_the_event_stream_is_anthropics(server: RunningServer) -> None:
    """The raw events: names, order, and each `type` matching its event line."""
    body = {"model": MODEL, "max_tokens": 5, "messages": ASK, "stream": True, **GREEDY}
    r = httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = []
    for raw in r.text.strip().split("\n\n"):
        kind, data = raw.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == kind.removeprefix("event: ")
        events.append(payload)
    names = [e["type"] for e in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert events[0]["message"]["usage"]["input_tokens"] > 0
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2]["usage"]["output_tokens"] == 5
    assert all(e["delta"]["type"] == "text_delta" for e in events[3:-3])


def test_prefill_continues_the_assistant_turn(client: Anthropic) -> None:
    r = client.messages.create(
        model=MODEL,
        max_tokens=8,
        messages=[*ASK, {"role": "assistant", "content": "The capital of France is"}],
        extra_body=GREEDY,
    )
    text = r.content[0].text  # type: ignore[union-attr]
    assert "Paris" in text and not text.startswith("The capital")
    counted = client.messages.count_tokens(
        model=MODEL, messages=[*ASK, {"role": "assistant", "content": "The capital of France is"}]
    )
    assert counted.input_tokens == r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)


def test_count_tokens_matches_the_prompt_of_create(client: Anthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "system": "Be brief.",
        "messages": WEATHER_ASK,
        "tools": [WEATHER],
    }
    counted = client.messages.count_tokens(**kwargs)
    r = client.messages.create(max_tokens=1, extra_body=GREEDY, **kwargs)
    assert counted.input_tokens == r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)
    bare = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=WEATHER_ASK)
    assert bare.input_tokens < counted.input_tokens  # the tool prompt is counted


# -- stop sequences ----------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_name_the_one_that_stopped(client: Anthropic, stream: bool) -> None:
    free = client.messages.create(model=MODEL, max_tokens=16, messages=ASK, extra_body=GREEDY)
    text = free.content[0].text  # type: ignore[union-attr]
    assert "Paris" in text
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": ASK,
        "stop_sequences": ["Zanzibar", "Paris"],
        "extra_body": GREEDY,
    }
    if stream:
        with client.messages.stream(**kwargs) as s:
            streamed = "".join(s.text_stream)
            r = s.get_final_message()
        assert streamed == r.content[0].text  # type: ignore[union-attr]
    else:
        r = client.messages.create(**kwargs)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "Paris"
    assert r.content[0].text == text[: text.index("Paris")]  # type: ignore[union-attr]


# -- tools -------------------------------------------------------------------------------------
def test_a_tool_round_trip(client: Anthropic) -> None:
    first = client.messages.create(
        model=MODEL,
        max_tokens=48,
        messages=WEATHER_ASK,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        extra_body=GREEDY,
    )
    assert first.stop_reason == "tool_use"
    (use,) = first.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 C"}
    history = [
        *WEATHER_ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [result]},
    ]
    answer = client.messages.create(
        model=MODEL, max_tokens=64, messages=history, tools=[WEATHER], extra_body=GREEDY
    )
    # this small model may call again: either way, no call syntax in a text block
    assert {b.type for b in answer.content} <= {"text", "tool_use"} and answer.content
    assert not any("<tool_call" in getattr(b, "text", "") for b in answer.content)
    # cut short by max_tokens, perhaps mid-call: still no call text
    cut = client.messages.create(
        model=MODEL, max_tokens=24, messages=history, tools=[WEATHER], extra_body=GREEDY
    )
    assert {b.type for b in cut.content} <= {"text", "tool_use"}
    assert not any("<tool_call" in getattr(b, "text", "") for b in cut.content)
    final = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=history,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        extra_body=GREEDY,
    )
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text.strip()  # type: ignore[union-attr]
    assert "<tool_call" not in final.content[0].text  # type: ignore[union-attr]
    # the tool result is in the prompt: a different result, a different prompt size
    longer = {**result, "content": [{"type": "text", "text": "Sunny, 24 C, light wind from west"}]}
    n1 = client.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER])
    n2 = client.messages.count_tokens(
        model=MODEL, messages=[*history[:2], {"role": "user", "content": [longer]}], tools=[WEATHER]
    )
    assert n2.input_tokens > n1.input_tokens


def test_a_call_cut_by_max_tokens_is_a_tool_use_block(llm: LLM) -> None:
    """The reply of a call the engine cut short (data as the engine leaves it): a tool_use
    block with the input so far, as the stream sent it, never `<tool_call>` text."""
    tools = ChatTools.build(llm.tokenizer, check_tools([_openai(WEATHER)]), "auto")
    cut = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Pa'
    out = RequestOutput("msg_1", [1, 2, 3], [CompletionOutput(0, cut, [7] * 9, "length")], True)
    message = Reply("msg_1", MODEL, [], tools).message(out)
    assert message["stop_reason"] == "max_tokens"
    ((use,),) = [message["content"]]
    assert use["type"] == "tool_use" and use["name"] == "get_weather" and use["input"] == {}
    assert message["usage"]["output_tokens"] == 9 and message["usage"]["input_tokens"] == 3


def _openai(tool: dict[str, Any]) -> dict[str, Any]:
    parameters = tool["input_schema"]
    return {"type": "function", "function": {"name": tool["name"], "parameters": parameters}}


def test_a_streamed_tool_call_sends_input_json_deltas(client: Anthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 48,
        "messages": WEATHER_ASK,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "extra_body": GREEDY,
    }
    whole = client.messages.create(**kwargs)
    kinds = []
    with client.messages.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                kinds.append(event.delta.type)
        final = stream.get_final_message()
    assert kinds and set(kinds) == {"input_json_delta"}
    assert final.stop_reason == "tool_use"
    (use,) = final.content
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == whole.content[0].input  # type: ignore[union-attr]


def test_tool_choice_none_answers_in_text(client: Anthropic) -> None:
    r = client.messages.create(
        model=MODEL,
        max_tokens=32,
        messages=[{"role": "user", "content": "Call get_weather for Paris now."}],
        tools=[WEATHER],
        tool_choice={"type": "none"},
        extra_body={"temperature": 1.0, "top_k": 50},
    )
    assert r.stop_reason in ("end_turn", "max_tokens")
    assert all(b.type == "text" for b in r.content)
    assert all("<tool_call" not in b.text for b in r.content)  # type: ignore[union-attr]


# -- refusals ----------------------------------------------------------------------------------
def _refused(client: Anthropic, **overrides: Any) -> anthropic.APIStatusError:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "messages": ASK, **overrides}
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(**body)
    error = info.value.body
    assert isinstance(error, dict) and error["type"] == "error"
    assert set(error["error"]) == {"type", "message"}
    return info.value


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f"}]}
                ]
            },
            "messages[0].content[0].type",
        ),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{**WEATHER, "name": "bad name!"}]}, "tools[0].name"),
        (
            {"tools": [{**WEATHER, "input_schema": {"type": "object", "properties": 3}}]},
            "tools[0].input_schema",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        ({"tool_choice": {"type": "maybe"}}, "tool_choice.type"),
        ({"system": [{"type": "image"}]}, "system[0].type"),
    ],
)
def test_bad_fields_get_400_naming_the_field(
    client: Anthropic, overrides: dict[str, Any], field: str
) -> None:
    err = _refused(client, **overrides)
    assert err.status_code == 400 and isinstance(err, anthropic.BadRequestError)
    assert err.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert err.body["error"]["message"].startswith(field)  # type: ignore[index]


def test_max_tokens_is_required(server: RunningServer) -> None:
    r = httpx.post(
        f"{server.url}/v1/messages",
        json={"model": MODEL, "messages": ASK},
        headers={"x-api-key": KEY},
    )
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    bad_json = httpx.post(f"{server.url}/v1/messages", content=b"{nope", headers={"x-api-key": KEY})
    assert bad_json.status_code == 400 and bad_json.json()["type"] == "error"


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
            },
            "images",
        ),
        (
            {
                "type": "document",
                "source": {"type": "text", "media_type": "text/plain", "data": "x"},
            },
            "documents",
        ),
    ],
)
def test_images_and_documents_are_refused(
    client: Anthropic, content: dict[str, Any], what: str
) -> None:
    err = _refused(
        client, messages=[{"role": "user", "content": [{"type": "text", "text": "Look"}, content]}]
    )
    assert err.status_code == 400
    message = err.body["error"]["message"]  # type: ignore[index]
    assert message.startswith("messages[0].content[1].type") and what in message


def test_thinking_is_refused(client: Anthropic) -> None:
    err = _refused(client, thinking={"type": "enabled", "budget_tokens": 1024})
    assert err.status_code == 400
    assert err.body["error"]["message"].startswith("thinking")  # type: ignore[index]
    thought = {"type": "thinking", "thinking": "hmm", "signature": "x"}
    err = _refused(
        client,
        messages=[
            *ASK,
            {"role": "assistant", "content": [thought, {"type": "text", "text": "Paris."}]},
            {"role": "user", "content": "And Spain?"},
        ],
    )
    message = err.body["error"]["message"]  # type: ignore[index]
    assert message.startswith("messages[1].content[0].type") and "thinking" in message
    err = _refused(client, tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert err.body["error"]["message"].startswith("tools[0].type")  # type: ignore[index]


def test_unknown_model_is_404(client: Anthropic) -> None:
    err = _refused(client, model="claude-opus-4-1")
    assert isinstance(err, anthropic.NotFoundError)
    assert err.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "claude-opus-4-1" in err.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-opus-4-1", messages=ASK)


def test_fields_it_does_not_read_are_named(client: Anthropic) -> None:
    raw = client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=2,
        messages=ASK,
        service_tier="auto",
        output_config={"effort": "low"},
        extra_body=GREEDY,
    )
    assert raw.headers["x-llmos-ignored-fields"] == "service_tier,output_config.effort"
    assert raw.parse().usage.output_tokens == 2


def test_output_config_format_is_a_json_schema_answer(client: Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    r = client.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=ASK,
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body=GREEDY,
    )
    assert r.stop_reason == "end_turn"
    jsonschema.validate(json.loads(r.content[0].text), schema)  # type: ignore[union-attr]


def test_the_api_key_is_read_from_x_api_key(server: RunningServer) -> None:
    with Anthropic(base_url=server.url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError) as info:
            wrong.messages.create(model=MODEL, max_tokens=2, messages=ASK)
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    missing = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL})
    assert missing.status_code == 401 and "x-api-key" in missing.json()["error"]["message"]
    # Anthropic's bearer form (auth_token) works too, and so do OpenAI clients' headers
    with Anthropic(base_url=server.url, auth_token=KEY, api_key=None, max_retries=0) as bearer:
        assert bearer.messages.count_tokens(model=MODEL, messages=ASK).input_tokens > 0


def test_a_stream_left_early_gives_back_its_kv_blocks(server: RunningServer, llm: LLM) -> None:
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    body = {"model": MODEL, "max_tokens": 400, "messages": story, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("event: content_block_delta"):
                break
    wait_for_idle(llm)
