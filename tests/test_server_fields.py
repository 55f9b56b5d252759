"""Fields the server does not read are named (header and log), or refused with --strict-fields.

Through the official client: its `extra_body` fields arrive at the top level of the body, as a
misspelled or newer field would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai import OpenAI

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.server.app import create_app, server_state
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.state import ServerConfig

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "Hi"}]
HEADER = "x-llmos-ignored-fields"
# extras llmos reads: never reported
KNOWN = {"priority": 2, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True}


@pytest.fixture(scope="module")
def app(llm: LLM) -> FastAPI:
    return create_app(AsyncEngine(llm.engine), ServerConfig())


@pytest.fixture(scope="module")
def server(app: FastAPI) -> Iterator[RunningServer]:
    with serve_in_thread(app) as running:
        yield running


def client_for(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def test_unknown_fields_are_named_in_a_header(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_for(server)
    caplog.set_level(logging.WARNING, logger="llmos.server.fields")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        max_tokens=2,
        messages=[{"role": "user", "content": "Hi", "mood": "happy"}],
        stream_options=None,
        extra_body={"moderation": ["pii"], "store": True, **KNOWN},
    )
    assert raw.headers[HEADER] == "moderation,store,messages[0].mood"
    assert raw.parse().usage.completion_tokens == 2
    (record,) = [r for r in caplog.records if getattr(r, "ignored_fields", None)]
    assert record.ignored_fields == ["moderation", "store", "messages[0].mood"]  # type: ignore[attr-defined]
    assert record.path == "/v1/chat/completions"  # type: ignore[attr-defined]

    plain = client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=1, messages=CHAT, extra_body=KNOWN
    )
    assert HEADER not in plain.headers


def test_streams_and_completions_carry_the_header_too(
    server: RunningServer,
) -> None:
    client = client_for(server)
    raw = client.completions.with_raw_response.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        extra_body={"max_token": 5, **KNOWN},
    )
    assert raw.headers[HEADER] == "max_token,stream_options.include_obfuscation"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_unknown_keys_inside_response_format_and_tools_are_named(
    server: RunningServer,
) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=120,
        json={
            "messages": CHAT,
            "max_tokens": 2,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True, "v": 1},
            },
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object"}, "strict": True},
                    "cache": True,
                }
            ],
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers[HEADER] == "response_format.json_schema.v,tools[0].cache"


def test_error_responses_carry_the_header(server: RunningServer) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "no-such-model", "prompt": "x", "temprature": 0},
    )
    assert r.status_code == 404 and r.headers[HEADER] == "temprature"


def test_odd_field_names_give_a_valid_header(server: RunningServer) -> None:
    names = {f"k{i}": i for i in range(40)} | {"a\r\nSet-Cookie: x": 1, "é,ü": 2}
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "x", "max_tokens": 1, **names},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    header = r.headers[HEADER]
    assert header.isascii() and header.isprintable() and "set-cookie" not in r.headers
    assert header.startswith("k0,k1,") and header.endswith("...(10 more)")


def test_strict_fields_refuses_them_as_openai_does(
    server: RunningServer, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ServerConfig(strict_fields=True), which `llmos serve --strict-fields` sets."""
    monkeypatch.setattr(server_state(app).config, "strict_fields", True)
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, max_tokens=2, messages=CHAT, extra_body={"moderation": [], **KNOWN}
        )
    assert err.value.body == {
        "message": "Unrecognized request argument supplied: moderation",
        "type": "invalid_request_error",
        "param": "moderation",
        "code": "unknown_parameter",
    }
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=1, stream=True, extra_body={"a": 1, "b": 2}
        )
    assert err.value.body["message"] == "Unrecognized request argument supplied: a, b"
    ok = client.chat.completions.create(model=MODEL, max_tokens=1, messages=CHAT, extra_body=KNOWN)
    assert ok.usage.completion_tokens == 1
