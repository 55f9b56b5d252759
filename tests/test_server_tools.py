"""Structured output and tool calls over HTTP, through the official `openai` client against the
real server (the fixtures of test_server.py): `.parse()` with a Pydantic model, refusals in
OpenAI's shape, tool_choice, and a whole tool round trip, streaming and not."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from test_server import MODEL, client, reference, server  # noqa: F401 - fixtures

from llmos.server.streaming import ToolCallStream

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int


def test_parse_returns_the_pydantic_model(client: OpenAI) -> None:  # noqa: F811
    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format=City,
        temperature=0,
        max_tokens=80,
    )
    (choice,) = r.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_json_object_mode(client: OpenAI) -> None:  # noqa: F811
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A JSON object about cats."}],
        response_format={"type": "json_object"},
        temperature=0.8,
        seed=3,
        max_tokens=60,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    else:
        assert (r.choices[0].message.content or "").startswith("{")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "strict": True,
                        "schema": {
                            "type": "object",
                            "properties": {"tags": {"type": "array", "uniqueItems": True}},
                        },
                    },
                }
            },
            "response_format.json_schema.schema.properties.tags.uniqueItems",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"d": {"type": "string", "format": "zip"}},
                            },
                        },
                    }
                ]
            },
            "tools[0].function.parameters.properties.d.format",
        ),
        ({"extra_body": {"guided_regex": "[0-9"}}, "guided_regex"),
    ],
)
def test_what_cannot_be_enforced_is_a_named_400(
    client: OpenAI,  # noqa: F811
    body: dict[str, Any],
    param: str,
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **body)
    assert info.value.status_code == 400
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.rsplit(".", 1)[-1].split("[")[0] in error["message"]


def test_tool_choice_required_named_and_none(client: OpenAI) -> None:  # noqa: F811
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0.7,
        seed=1,
        max_tokens=48,
    )
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    named = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        max_tokens=48,
        temperature=0.7,
        seed=2,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert {c.function.name for c in named.choices[0].message.tool_calls or []} == {"get_time"}
    none = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=24
    )
    assert none.choices[0].message.tool_calls is None
    assert "<tool_call>" not in (none.choices[0].message.content or "")


def _streamed(
    client: OpenAI,  # noqa: F811
    messages: list[Any],
    tool_choice: str = "auto",
) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, tool calls, finish reason) put together from stream deltas, as clients do."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=48,
        stream=True,
    ):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                if d.function is not None:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_round_trip(client: OpenAI, stream: bool) -> None:  # noqa: F811
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=48,
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    call = message.tool_calls[0]
    if stream:  # the same greedy call, streamed: id, type and name first, then the arguments
        content, calls, finish = _streamed(client, ASK, "required")
        assert finish == "tool_calls" and content == ""
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in message.tool_calls
        ]
        assert all(c["id"].startswith("call_") for c in calls)
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"city": "Paris", "temperature_c": 18, "sky": "clear"}),
        },
    ]
    if stream:
        content, calls, finish = _streamed(client, history)
    else:
        answer = client.chat.completions.create(
            model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=48
        )
        content = answer.choices[0].message.content or ""
        calls, finish = answer.choices[0].message.tool_calls or [], answer.choices[0].finish_reason
    assert finish in ("stop", "length") and not calls and content.strip()


def test_the_stream_helper_parses_strict_tool_arguments(client: OpenAI) -> None:  # noqa: F811
    tool = openai.pydantic_function_tool(City, name="city_facts")
    with client.chat.completions.stream(
        model=MODEL,
        messages=ASK,
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, City)


def test_tool_call_stream_deltas() -> None:
    stream = ToolCallStream()
    pieces = [
        "<tool",
        '_call>[{"name": "get_weather", "arg',
        'uments": {"ci',
        'ty": "Oslo"}}, ',
        '{"name": "get_weather", "arguments": {"city": "Rome"}}]</tool_call>',
    ]
    out = [stream.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert all(content == "" for content, _ in out)
    deltas = [d for _, ds in out for d in ds]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    args = [
        "".join(d["function"].get("arguments", "") for d in deltas if d["index"] == i)
        for i in (0, 1)
    ]
    assert args == ['{"city": "Oslo"}', '{"city": "Rome"}'] and stream.called
    text = ToolCallStream()
    assert text.feed("<tool", final=False) == ("", [])  # might still become a call
    assert text.feed("s are fun", final=False) == ("<tools are fun", [])
    assert text.feed("!", final=True) == ("!", []) and not text.called
