"""The server's refusals that need their own settings (API key, queue limit) and its shutdown.

Each test runs its own server (a fresh `AsyncEngine` over the shared engine), so one that
stops its server leaves nothing behind for the next.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx
import openai
import pytest
from openai import OpenAI

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.state import ServerConfig

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "Tell me a long story about a dragon."}]

ServerFactory = Callable[..., AbstractContextManager[RunningServer]]


@pytest.fixture
def make_server(llm: LLM) -> ServerFactory:
    def make(grace: float = 30.0, **config: object) -> AbstractContextManager[RunningServer]:
        app = create_app(AsyncEngine(llm.engine), ServerConfig(**config))  # type: ignore[arg-type]
        return serve_in_thread(app, grace=grace)

    return make


def client_for(server: RunningServer, key: str = "none") -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def kv_used(server: RunningServer) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("llmos_kv_blocks_used "):
            return float(line.split()[1])
    raise AssertionError("no llmos_kv_blocks_used on /metrics")


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_api_key_is_required_on_v1_only(make_server: ServerFactory) -> None:
    with make_server(api_key="sekrit") as server:
        with pytest.raises(openai.AuthenticationError) as err:
            client_for(server, "wrong").chat.completions.create(model=MODEL, messages=CHAT)
        assert err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client_for(server, "wrong").models.list()
        r = httpx.post(f"{server.url}/v1/completions", content=b"{not json")
        assert r.status_code == 401 and set(r.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        ok = client_for(server, "sekrit").chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=2
        )
        assert ok.usage.completion_tokens == 2
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert 'llmos_requests_total{status="401"} 3.0' in httpx.get(f"{server.url}/metrics").text


def test_429_when_more_than_max_waiting_would_wait(make_server: ServerFactory, llm: LLM) -> None:
    batch = llm.engine.config.max_num_seqs
    with make_server(max_waiting=0) as server:
        client = client_for(server)
        idle = kv_used(server)
        # One request whose `batch` sequences fill the engine's batch: the next one would wait.
        stream = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            n=batch,
            max_tokens=40,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["type"] == "rate_limit_error"
        stream.close()
        assert wait_until(lambda: kv_used(server) == idle)
        assert wait_until(lambda: 'status="499"' in httpx.get(f"{server.url}/metrics").text)
        ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert ok.usage.completion_tokens == 2


def test_a_huge_prompt_is_refused_before_tokenizing(make_server: ServerFactory) -> None:
    with make_server() as server:
        for route, body in (
            ("completions", {"prompt": "ab " * 400_000}),
            ("chat/completions", {"messages": [{"role": "user", "content": "ab " * 400_000}]}),
        ):
            r = httpx.post(f"{server.url}/v1/{route}", json={"model": MODEL, **body}, timeout=60)
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["code"] == "context_length_exceeded" and "at least" in error["message"]


def test_connections_send_without_delay(make_server: ServerFactory) -> None:
    """TCP_NODELAY on every connection: each SSE event leaves at once, on reused connections
    too (Nagle's algorithm with delayed ACKs would hold small writes back)."""
    with make_server() as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/health").status_code == 200
        sockets = [
            c.transport.get_extra_info("socket") for c in server.server.server_state.connections
        ]
        assert sockets and all(
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets
        )


def test_sigterm_lets_streams_in_flight_finish(make_server: ServerFactory) -> None:
    with make_server() as server:
        client = client_for(server)
        stream = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=12,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [next(iter(stream))]
        server.drain()
        assert wait_until(lambda: not _accepts(server))  # new requests are refused at once
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert sum(len(c.choices) for c in chunks) >= 2
        assert server.join(60)


def test_sigterm_aborts_what_outlives_the_grace_period(
    make_server: ServerFactory, llm: LLM
) -> None:
    with make_server(grace=1) as server:
        client = client_for(server)
        stream = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=3000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))
        done = threading.Event()

        def read_rest() -> None:
            try:
                for _ in stream:
                    pass
            except (openai.APIError, httpx.HTTPError):
                pass
            done.set()

        threading.Thread(target=read_rest, daemon=True).start()
        server.drain()
        assert server.join(60)
        assert done.wait(60)
    # The engine thread has stopped: its state can be read directly.
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.blocks.num_used == 0


def _accepts(server: RunningServer) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
