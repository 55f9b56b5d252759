"""Schemathesis against a real `llmos serve` app on a loopback port, on every route of its
OpenAPI document: valid bodies (by the schema) and invalid ones.

Pass mark: no response >= 500, no call past its time bound, every 4xx in OpenAI's error shape,
every stream ending in [DONE] (an error event in OpenAI's shape before it, if any; a Responses
stream in its last typed event, as OpenAI's has no [DONE]), and every
KV block back once the load is gone. The server's engine has a small context (MAX_MODEL_LEN), so
that no generated request is costly; `n` is held to 2 for the same reason.

LLMOS_FUZZ_EXAMPLES sets the examples per route and generation mode (default 50; the long run:
`LLMOS_FUZZ_EXAMPLES=1000 pytest -s tests/test_server_fuzz.py`).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.state import ServerConfig

EXAMPLES = int(os.environ.get("LLMOS_FUZZ_EXAMPLES", "50"))
MAX_MODEL_LEN = 96
CALL_TIMEOUT = 30.0  # seconds: a call that takes longer counts as a hang
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def small_llm() -> LLM:
    return LLM(kv_cache_memory="32MiB", max_model_len=MAX_MODEL_LEN, max_num_seqs=8)


@pytest.fixture(scope="module")
def server(small_llm: LLM) -> Iterator[RunningServer]:
    app = create_app(AsyncEngine(small_llm.engine), ServerConfig(max_body_bytes=64 * 1024))
    with serve_in_thread(app) as running:
        yield running


def _cheap(case: Case) -> None:
    """Hold `n` to 2, so a generated request costs at most 2 x MAX_MODEL_LEN tokens."""
    body = case.body
    if isinstance(body, dict):
        for key in ("n", "best_of"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 2 < value <= 128:
                body[key] = 2


def _is_error(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"error"}
        and isinstance(body["error"], dict)
        and set(body["error"]) == ERROR_KEYS
        and isinstance(body["error"]["message"], str)
        and isinstance(body["error"]["type"], str)
    )


def check_response(case: Case, response: httpx.Response) -> None:
    where = f"{case.method} {case.path} {json.dumps(case.body, default=str)[:600]}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:600]}"
    kind = response.headers.get("content-type", "")
    if response.status_code >= 400:
        assert kind.startswith("application/json"), f"{where} -> {kind}"
        assert _is_error(response.json()), f"{where} -> {response.text[:600]}"
    elif kind.startswith("text/event-stream") and case.path == "/v1/responses":
        _check_typed_events(where, [e for e in response.text.split("\n\n") if e])
    elif kind.startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]", f"{where} -> {response.text[-600:]}"
        for e in events[:-1]:
            data = json.loads(e.removeprefix("data: "))
            assert "error" not in data or _is_error(data), f"{where} -> {e}"
    elif case.path != "/metrics":
        assert kind.startswith("application/json"), f"{where} -> {kind}"


def _check_typed_events(where: str, events: list[str]) -> None:
    """A Responses stream: typed events numbered in order, ending (as OpenAI's, without [DONE])
    in the response's last state or an error event."""
    data = [json.loads(e.partition("data: ")[2]) for e in events]
    assert [d["sequence_number"] for d in data] == list(range(len(data))), where
    last = data[-1]["type"] if data else None
    ends = ("response.completed", "response.incomplete", "response.failed")
    assert last in ends, f"{where} -> {last}"


def fuzz(server: RunningServer, examples: int, statuses: Counter[int]) -> dict[str, int]:
    """Cases sent per route and mode; `statuses` counts the answers."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    counts: dict[str, int] = {}
    with httpx.Client(base_url=server.url, timeout=CALL_TIMEOUT) as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in GenerationMode:
                label = f"{operation.label} [{mode.value}]"
                counts[label] = 0
                _runner(http, server.url, operation.as_strategy(generation_mode=mode), examples)(
                    lambda status, label=label: (
                        counts.__setitem__(label, counts[label] + 1),
                        statuses.update([status]),
                    )
                )
    return counts


def _runner(
    http: httpx.Client, base_url: str, strategy: Any, examples: int
) -> Callable[[Callable[[int], object]], None]:
    def run(sent: Callable[[int], object]) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def one(case: Case) -> None:
            _cheap(case)
            kwargs = case.as_transport_kwargs(base_url=base_url)
            request = http.build_request(
                kwargs["method"],
                kwargs["url"],
                headers={k: str(v) for k, v in (kwargs.get("headers") or {}).items()},
                params=kwargs.get("params"),
                content=_content(kwargs),
            )
            started = time.monotonic()
            try:
                response = http.send(request)
            except httpx.TimeoutException:
                pytest.fail(f"hang: {case.method} {case.path} {case.body!r:.600}")
            assert time.monotonic() - started < CALL_TIMEOUT
            sent(response.status_code)
            check_response(case, response)

        try:
            one()
        except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
            pass

    return run


def _content(kwargs: dict[str, Any]) -> bytes | None:
    if "json" in kwargs:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data") or kwargs.get("content")
    if isinstance(data, str):
        return data.encode()
    return data


def test_schemathesis_finds_no_500_no_hang_and_only_openai_errors(
    server: RunningServer, small_llm: LLM
) -> None:
    started = time.monotonic()
    statuses: Counter[int] = Counter()
    counts = fuzz(server, EXAMPLES, statuses)
    total = sum(counts.values())
    print(f"\nschemathesis: {total} cases in {time.monotonic() - started:.1f} s")
    print(f"  statuses: {dict(sorted(statuses.items()))}")
    for label, n in sorted(counts.items()):
        print(f"  {n:5d}  {label}")
    assert all(n > 0 for label, n in counts.items() if "POST" in label), counts
    assert httpx.get(f"{server.url}/health").status_code == 200
    deadline = time.monotonic() + 60
    while small_llm.engine.has_unfinished_requests() or small_llm.engine.blocks.num_used:
        assert time.monotonic() < deadline, "KV blocks held after the fuzzing"
        time.sleep(0.1)


def test_openapi_describes_every_request_body(server: RunningServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model in (
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
    ):
        op = doc["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"} and op["requestBody"]["required"]
        assert "text/event-stream" in op["responses"]["200"]["content"]
        assert "x-llmos-ignored-fields" in op["responses"]["200"]["headers"]
        assert "422" not in op["responses"]
    assert schemas["ChatCompletionRequest"]["required"] == ["messages"]
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    assert {"priority", "top_k", "response_format", "tools"} <= set(
        schemas["ChatCompletionRequest"]["properties"]
    )
    assert schemas["ChatMessage"]["properties"]["role"]["enum"][0] == "system"
    refs = {m for m in json.dumps(doc).split('"') if m.startswith("#/components/schemas/")}
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)
    # the declared body does not change who reads it: a bad one still gets OpenAI's 400
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}')
    assert r.status_code == 200, r.text  # no content-type, as curl -d sends: still JSON


# -- defects the fuzzing found, each pinned -----------------------------------------------------
@pytest.mark.parametrize("bad", [2**40, -1, 49152])
def test_echo_of_token_ids_outside_the_vocabulary_is_a_400(server: RunningServer, bad: int) -> None:
    """`echo` decoded the ids before they were checked: an id past 2**32 was a 500."""
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": [1, bad], "echo": True, "max_tokens": 1},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and str(bad) in r.json()["error"]["message"]


def test_a_500_keeps_the_connection_open(
    server: RunningServer, small_llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route's unexpected error was answered by Starlette's outermost middleware, which then
    re-raised it: uvicorn closed the connection, and the next request on it was reset."""

    def broken(*args: object, **kwargs: object) -> list[int]:
        raise KeyError("simulated bug")

    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        monkeypatch.setattr(small_llm.engine.tokenizer, "encode", broken)
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 500 and _is_error(r.json())
        assert r.json()["error"]["type"] == "server_error"
        monkeypatch.undo()
        assert http.get("/health").status_code == 200  # same connection
        assert len(server.server.server_state.connections) == 1
