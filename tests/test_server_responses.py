"""`/v1/responses` through the official `openai` client and the OpenAI Agents SDK's default
model class (OpenAIResponsesModel), against a real uvicorn server with the real embedded model
and a real SQLite store: create, stream, parse, tools, stored conversations continued by
`previous_response_id` (through the prefix cache), retrieval, deletion and refusals."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.errors import RequestError
from llmos.server import fields
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.response_store import ResponseStore
from llmos.server.state import ServerConfig

MODEL = "smollm2-135m"
QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
ASK_WEATHER = "What is the weather in Paris?"
T = TypeVar("T")


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[RunningServer]:
    app = create_app(AsyncEngine(llm.engine), ServerConfig())
    with serve_in_thread(app) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[OpenAI]:
    """The official client; no field it sent may have been ignored by the server."""
    ignored: list[str] = []

    def record(response: httpx.Response) -> None:
        if fields.HEADER in response.headers:
            ignored.append(f"{response.request.url.path}: {response.headers[fields.HEADER]}")

    http = httpx.Client(timeout=120, event_hooks={"response": [record]})
    url = f"{server.url}/v1"
    with OpenAI(base_url=url, api_key="unused", max_retries=0, http_client=http) as c:
        yield c
    assert not ignored


def _idle(llm: LLM) -> None:
    """Wait (bounded) until the engine has finished or aborted every request."""
    deadline = time.monotonic() + 30
    while llm.engine.has_unfinished_requests() or llm.engine.blocks.num_used:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


# -- the same request a chat completion makes ---------------------------------------------------
def test_string_input_is_the_chat_completion(client: OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=12,
    )
    r = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=12)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content
    assert r.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.model == MODEL and r.max_output_tokens == 12
    # cut by max_output_tokens, as OpenAI reports it
    if r.usage.output_tokens == 12:
        assert r.status == "incomplete"
        assert r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"


def test_instructions_and_items_are_system_and_messages(client: OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": QUESTION},
    ]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=10
    )
    r = client.responses.create(
        model=MODEL,
        instructions="You are terse.",
        input=[
            {"role": "user", "content": "Hi"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": QUESTION}],
            },
        ],
        temperature=0,
        max_output_tokens=10,
        metadata={"case": "items"},
        user="alice",
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.usage is not None and r.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]
    assert r.instructions == "You are terse."
    assert r.metadata == {"case": "items"} and r.user == "alice"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")


# -- streaming ----------------------------------------------------------------------------------
def test_stream_sends_the_typed_events(client: OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=8)
    with client.responses.stream(
        model=MODEL, input=QUESTION, temperature=0, max_output_tokens=8
    ) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    head = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[:4] == head
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete" if whole.status == "incomplete" else "response.completed",
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-4].text == text  # output_text.done
    final = events[-1].response
    assert final.id == events[0].response.id and final.output_text == text
    assert final.usage is not None and final.usage.output_tokens == whole.usage.output_tokens  # type: ignore[union-attr]


def test_stream_get_final_response(client: OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input="Say hello.",
        instructions="Reply with one short sentence.",
        temperature=0,
        max_output_tokens=40,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()  # raises unless response.completed came
    assert final.status == "completed"
    assert final.output_text == "".join(deltas) and final.output_text


def test_stream_left_early_frees_its_blocks(client: OpenAI, llm: LLM) -> None:
    with client.responses.create(
        model=MODEL, input="Write a long story.", max_output_tokens=400, stream=True
    ) as stream:
        for i, _ in enumerate(stream):
            if i == 6:
                break
    _idle(llm)


# -- tools --------------------------------------------------------------------------------------
def test_function_call_then_its_output_continues_by_id(client: OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input=ASK_WEATHER,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert first.usage is not None
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_output_tokens=30,
    )
    assert second.previous_response_id == first.id
    assert [item.type for item in second.output] == ["message"]
    assert second.usage is not None
    # the whole first prompt (and the call) came from the prefix cache: full blocks of it
    block = 16
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= first.usage.input_tokens // block * block > 0


def test_tool_choice_names_a_function(client: OpenAI) -> None:
    other = {**WEATHER, "name": "get_time", "description": "Get the local time in a city"}
    r = client.responses.create(
        model=MODEL,
        input=ASK_WEATHER,
        tools=[other, WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=60,
    )
    assert [(i.type, getattr(i, "name", None)) for i in r.output] == [
        ("function_call", "get_weather")
    ]
    assert r.parallel_tool_calls is False


def test_stream_function_call(client: OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input=ASK_WEATHER,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert "response.output_text.delta" not in types
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == deltas and isinstance(json.loads(deltas)["city"], str)
    (call,) = final.output
    assert call.type == "function_call" and call.arguments == deltas
    assert call.call_id == added.item.call_id and call.id == added.item.id


# -- structured output --------------------------------------------------------------------------
class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


def test_parse_returns_the_pydantic_model(client: OpenAI) -> None:
    r = client.responses.parse(
        model=MODEL,
        input="Tell me about Paris.",
        text_format=City,
        temperature=0,
        max_output_tokens=60,
    )
    assert r.status == "completed"
    assert isinstance(r.output_parsed, City)
    assert City.model_validate_json(r.output_text) == r.output_parsed
    assert r.text is not None and r.text.format is not None
    assert r.text.format.type == "json_schema"


def test_json_object_format(client: OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        input="A JSON object describing a cat.",
        text={"format": {"type": "json_object"}},
        temperature=0,
        max_output_tokens=40,
    )
    assert r.output_text.startswith("{")
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)


# -- stored responses ---------------------------------------------------------------------------
def test_retrieve_then_delete(client: OpenAI, server: RunningServer) -> None:
    r = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=5)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage == r.usage
    deleted = httpx.delete(f"{server.url}/v1/responses/{r.id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    body = httpx.get(f"{server.url}/v1/responses/{r.id}").json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert r.id in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope")
    assert err.value.param == "previous_response_id"  # type: ignore[attr-defined]


def test_store_false_keeps_nothing(client: OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=3)
    assert r.store is False  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_store_persists_in_its_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "responses.sqlite"
    store = ResponseStore(path)
    store.put({"id": "resp_1", "output": [{"type": "message"}]}, [{"role": "user", "content": "a"}])
    store.close()
    again = ResponseStore(path)
    stored = again.get("resp_1")
    assert stored is not None
    assert stored.history() == [{"role": "user", "content": "a"}, {"type": "message"}]
    assert again.delete("resp_1") and not again.delete("resp_1") and again.get("resp_1") is None
    again.close()
    with sqlite3.connect(path) as db:  # old rows go when the store opens
        db.execute("INSERT INTO responses VALUES ('resp_old', 0, '{}', '[]')")
    assert ResponseStore(path).get("resp_old") is None
    with pytest.raises(RequestError, match="responses_db"):
        ResponseStore(tmp_path)  # a folder


def test_cli_default_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llmos.cli.serve import default_responses_db

    monkeypatch.setenv("LLMOS_CACHE_DIR", str(tmp_path))
    assert default_responses_db() == str(tmp_path / "responses.sqlite")
    monkeypatch.setenv("LLMOS_CACHE_DIR", "")
    assert default_responses_db() == ":memory:"


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        ({"input": []}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"input": "x " * 9000}, "input"),  # past the context
        ({"input": 5}, "input"),
    ],
)
def test_unsupported_or_bad_fields_are_400(
    server: RunningServer, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **extra}
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-9", input="Hi")


# -- the OpenAI Agents SDK's default path -------------------------------------------------------
def run_agents(server: RunningServer, main: Callable[[], Awaitable[T]]) -> T:
    """Run `main` with the Agents SDK's default client pointed at the server (no tracing);
    every request it makes must be to /v1/responses, with no field the server ignores."""
    agents = pytest.importorskip("agents")
    seen: list[tuple[str, str | None]] = []

    async def record(response: httpx.Response) -> None:
        seen.append((response.request.url.path, response.headers.get(fields.HEADER)))

    async def wrapped() -> T:
        async with AsyncOpenAI(
            base_url=f"{server.url}/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx.AsyncClient(timeout=120, event_hooks={"response": [record]}),
        ) as client:
            agents.set_tracing_disabled(True)
            agents.set_default_openai_client(client, use_for_tracing=False)
            agents.set_default_openai_api("responses")
            return await main()

    result = asyncio.run(wrapped())
    assert seen and all(s == ("/v1/responses", None) for s in seen), seen
    return result


def _weather_agent(calls: list[str]) -> Any:
    from agents import Agent, ModelSettings, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"Sunny, 21 C in {city}"

    return Agent(
        name="weather",
        instructions="Answer with the tools.",
        model=MODEL,
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
    )


def test_agents_sdk_run_calls_the_tool(server: RunningServer) -> None:
    from agents import Runner
    from agents.models.multi_provider import MultiProvider
    from agents.models.openai_responses import OpenAIResponsesModel

    calls: list[str] = []
    result = run_agents(server, lambda: Runner.run(_weather_agent(calls), ASK_WEATHER, max_turns=2))
    assert isinstance(MultiProvider().get_model(MODEL), OpenAIResponsesModel)  # the default
    assert len(calls) == 1 and calls[0]
    assert result.final_output == f"Sunny, 21 C in {calls[0]}"
    (raw,) = result.raw_responses
    assert raw.response_id is not None and raw.response_id.startswith("resp_")
    assert raw.usage.input_tokens > 0 and raw.usage.output_tokens > 0


def test_agents_sdk_run_streamed_calls_the_tool(server: RunningServer) -> None:
    from agents import Runner

    calls: list[str] = []

    async def main() -> tuple[list[str], Any]:
        result = Runner.run_streamed(_weather_agent(calls), ASK_WEATHER, max_turns=2)
        raw = [e.data.type async for e in result.stream_events() if e.type == "raw_response_event"]
        return raw, result.final_output

    raw, final_output = run_agents(server, main)
    assert raw[0] == "response.created" and raw[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in raw
    assert len(calls) == 1 and final_output == f"Sunny, 21 C in {calls[0]}"


def test_agents_sdk_text_answer(server: RunningServer) -> None:
    from agents import Agent, ModelSettings, Runner

    agent = Agent(
        name="plain",
        instructions="Reply with one short sentence.",
        model=MODEL,
        model_settings=ModelSettings(temperature=0, max_tokens=40),
    )
    result = run_agents(server, lambda: Runner.run(agent, "Say hello."))
    assert isinstance(result.final_output, str) and result.final_output


def test_streamed_response_is_stored_and_continues(client: OpenAI) -> None:
    with client.responses.stream(
        model=MODEL, input=QUESTION, instructions="Be brief.", temperature=0, max_output_tokens=20
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.usage == final.usage
    assert final.usage is not None
    follow = client.responses.create(
        model=MODEL,
        input="And of Italy?",
        instructions="Be brief.",
        previous_response_id=final.id,
        temperature=0,
        max_output_tokens=5,
    )
    assert follow.usage is not None
    assert follow.usage.input_tokens_details.cached_tokens >= final.usage.input_tokens // 16 * 16


# -- `llmos serve` as a user runs it ------------------------------------------------------------
def test_llmos_serve_keeps_responses_in_its_db(tmp_path: Path) -> None:
    db = tmp_path / "responses.sqlite"
    stderr = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from llmos.cli.main import app; app()",
            "serve",
            "--port",
            "0",
            "--kv-cache-memory",
            "64MiB",
            "--max-num-seqs",
            "4",
            "--responses-db",
            str(db),
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )

    def log() -> str:
        return (tmp_path / "stderr").read_text()[-3000:]

    try:
        assert proc.stdout is not None
        banner = ""
        deadline = time.monotonic() + 180
        while "Ctrl+C" not in banner:  # the banner ends with it
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, f"llmos serve exited: {log()}"
            banner += line
        url = re.search(r"http://127\.0\.0\.1:\d+", banner).group(0)  # type: ignore[union-attr]
        with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
            first = c.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
            second = c.responses.create(
                model=MODEL, input="Bye", previous_response_id=first.id, max_output_tokens=4
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        stderr.close()
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT id, input FROM responses").fetchall())
    assert set(rows) == {first.id, second.id}
    history = json.loads(rows[second.id])  # the first turn's input and output, then "Bye"
    assert [item.get("role") for item in history] == ["user", "assistant", "user"]
    assert history[0]["content"] == "Hi" and history[-1]["content"] == "Bye"


def test_openapi_describes_the_routes(server: RunningServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    op = doc["paths"]["/v1/responses"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert "text/event-stream" in op["responses"]["200"]["content"]
    schema = doc["components"]["schemas"]["ResponsesRequest"]
    assert schema["required"] == ["input"]
    assert {"tools", "text", "previous_response_id", "store"} <= set(schema["properties"])
    assert {"get", "delete"} <= set(doc["paths"]["/v1/responses/{response_id}"])


def test_an_engine_failure_mid_stream_ends_it_failed(
    client: OpenAI, llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated device failure")

    stream = client.responses.create(
        model=MODEL, input="Write a long story.", max_output_tokens=300, stream=True
    )
    first = next(iter(stream))
    assert first.type == "response.created"
    monkeypatch.setattr(llm.engine.runner, "run", broken)
    rest = list(stream)
    assert [e.type for e in rest[-2:]] == ["error", "response.failed"]
    assert "simulated device failure" in rest[-2].message  # type: ignore[union-attr]
    failed = rest[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and failed.id == first.response.id
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    monkeypatch.undo()
    with pytest.raises(openai.NotFoundError):  # a failed response is not stored
        client.responses.retrieve(failed.id)
    assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=2).usage
    _idle(llm)


def test_input_items_list_the_conversation(client: OpenAI, server: RunningServer) -> None:
    first = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3)
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Bye"}]}],
        max_output_tokens=3,
    )
    items = list(client.responses.input_items.list(second.id, order="asc"))
    assert [i.type for i in items] == ["message", "message", "message"]
    assert [i.role for i in items] == ["user", "assistant", "user"]  # type: ignore[union-attr]
    assert items[0].content[0].text == "Hi"  # type: ignore[union-attr]
    assert items[1].id == first.output[0].id and items[2].content[0].text == "Bye"  # type: ignore[union-attr]
    newest = list(client.responses.input_items.list(second.id))  # desc, OpenAI's default
    assert [i.id for i in newest] == [i.id for i in reversed(items)]
    page = client.responses.input_items.list(second.id, limit=2, order="asc")
    assert [i.id for i in page.data] == [i.id for i in items[:2]] and page.has_more
    assert [i.id for i in page.get_next_page().data] == [items[2].id]
    assert [i.id for i in client.responses.input_items.list(first.id)] == [items[0].id]
    r = httpx.get(f"{server.url}/v1/responses/{second.id}/input_items", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nope")
