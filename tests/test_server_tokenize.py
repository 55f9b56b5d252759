"""`/tokenize`, `/detokenize` and `/tokenizer_info` over real HTTP, checked against the engine's
own tokenizer, against what `/v1/chat/completions` counts, and through lm-eval's real
`RemoteTokenizer` (the client that counts tokens remotely)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
from openai import OpenAI

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread

TEXT = "Grüße aus Köln! 日本語 🤖 and code: def f(x): return x"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[RunningServer]:
    with serve_in_thread(create_app(AsyncEngine(llm.engine))) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_tokenize_prompt_matches_the_engine(llm: LLM, http: httpx.Client) -> None:
    body = http.post("/tokenize", json={"prompt": TEXT}).json()
    assert body["tokens"] == llm.tokenizer.encode(TEXT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 8192
    assert body["token_strs"] is None
    strs = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    assert strs.json()["token_strs"] == ["Hello", "Ġworld"]
    plain = http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()
    assert plain["tokens"] == llm.tokenizer.encode(TEXT, add_special_tokens=False)


def test_tokenize_messages_counts_what_chat_uses(server: RunningServer, http: httpx.Client):
    counts = []
    with OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
        for tools in (None, TOOLS):
            extra = {"tools": tools} if tools else {}
            counted = http.post("/tokenize", json={"messages": CHAT, **extra}).json()
            chat = client.chat.completions.create(
                model="smollm2-135m", messages=CHAT, max_tokens=1, temperature=0, **extra
            )
            assert counted["count"] == chat.usage.prompt_tokens == len(counted["tokens"])
            counts.append(counted["count"])
    assert counts[1] > counts[0] + 20  # the tool prompt was rendered
    no_gen = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})
    assert no_gen.json()["count"] < counts[0]


def test_detokenize_round_trip(llm: LLM, http: httpx.Client) -> None:
    ids = llm.tokenizer.encode(TEXT, add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": TEXT}
    eos = llm.tokenizer.eos_token_id
    special = http.post("/detokenize", json={"tokens": [eos]}).json()["prompt"]
    assert special == "<|im_end|>"  # special tokens are kept, as vLLM's /detokenize does
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [5, -1]}, "tokens[1]"),
        ("/detokenize", {"tokens": [49152]}, "tokens[0]"),
        ("/detokenize", {"tokens": [2**40]}, "tokens[0]"),
        ("/detokenize", {"tokens": ["a"]}, "tokens[0]"),
        ("/detokenize", {"tokens": "12"}, "tokens"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/tokenize", {"prompt": "a", "tools": TOOLS}, "tools"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    http: httpx.Client, path: str, body: dict, param: str
) -> None:
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_unknown_model_and_bad_json(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/detokenize", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_lm_eval_remote_tokenizer(llm: LLM, server: RunningServer) -> None:
    """lm-eval's own client for vLLM's tokenizer endpoints detects and uses them."""
    base = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(base)
    remote = RemoteTokenizer(base)
    assert remote.eos_token == "<|im_end|>" and remote.eos_token_id == llm.tokenizer.eos_token_id
    assert remote.encode(TEXT) == llm.tokenizer.encode(TEXT, add_special_tokens=False)
    assert remote.decode(remote.encode(TEXT)) == TEXT
    rendered = remote.apply_chat_template(CHAT)
    assert rendered == llm.tokenizer.apply_chat_template(CHAT)
