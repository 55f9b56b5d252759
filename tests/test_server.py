"""`llmos serve` through the official `openai` client, sync and async, against a real uvicorn
server on a loopback port with the real embedded model.

The greedy prompts here have clear margins between their best two tokens (checked below), so
their outputs do not depend on batching or on prefix-cache hits.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from llmos import LLM, SamplingParams
from llmos.engine.async_engine import AsyncEngine
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.state import ServerConfig

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
GREEDY_TOKENS = 12
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def reference(llm: LLM) -> dict[str, object]:
    """Offline greedy outputs, made before the server takes over the engine."""
    chat = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, logprobs=2))[0]
    cmpl = llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True, logprobs=2)
    )[0]
    return {
        "chat": chat,
        "cmpl": cmpl,
        "chat_prompt_tokens": len(chat.prompt_token_ids),
        "cmpl_prompt_tokens": len(cmpl.prompt_token_ids),
    }


@pytest.fixture(scope="module")
def server(llm: LLM, reference: dict[str, object]) -> Iterator[RunningServer]:
    app = create_app(AsyncEngine(llm.engine), ServerConfig(max_body_bytes=MAX_BODY))
    with serve_in_thread(app) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def metrics(server: RunningServer) -> dict[str, float]:
    """Every sample on /metrics, keyed like `name{label="value"}`."""
    text = httpx.get(f"{server.url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for_idle(server: RunningServer, kv_idle: float, min_499: float = 0) -> dict[str, float]:
    """Poll /metrics (bounded) until the engine is idle with its KV blocks back."""
    deadline = time.monotonic() + 60
    while True:
        m = metrics(server)
        idle = (
            m["llmos_kv_blocks_used"] == kv_idle
            and m["llmos_num_requests_running"] == 0
            and m["llmos_num_requests_waiting"] == 0
            and m.get('llmos_requests_total{status="499"}', 0) >= min_499
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_reference_prompts_have_clear_margins(reference: dict[str, object]) -> None:
    for out in (reference["chat"], reference["cmpl"]):
        for lp in out.logprobs:  # type: ignore[attr-defined]
            (_, best), (_, second) = lp.top
            assert best - second > 0.02


# -- the happy paths ---------------------------------------------------------------------------
def test_models_and_health(client: OpenAI, server: RunningServer) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_chat_matches_the_engine_and_counts_usage(
    client: OpenAI, reference: dict[str, object]
) -> None:
    ref = reference["chat"]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=GREEDY_TOKENS
    )
    r = raw.parse()
    assert raw.headers["x-request-id"] == r.id
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text  # type: ignore[attr-defined]
    assert choice.finish_reason == ref.finish_reason  # type: ignore[attr-defined]
    assert r.usage.prompt_tokens == reference["chat_prompt_tokens"]
    assert r.usage.completion_tokens == len(ref.token_ids)  # type: ignore[attr-defined]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_completion_matches_the_engine(client: OpenAI, reference: dict[str, object]) -> None:
    ref = reference["cmpl"]
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        temperature=0,
        max_tokens=GREEDY_TOKENS,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == ref.text  # type: ignore[attr-defined]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == reference["cmpl_prompt_tokens"]
    assert r.usage.completion_tokens == GREEDY_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + GREEDY_TOKENS


def test_chat_stream_deltas_join_to_the_whole_answer(client: OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=GREEDY_TOKENS
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            temperature=0,
            max_tokens=GREEDY_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and reasons.count(None) == len(reasons) - 1
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_deltas_join_to_the_whole_text(client: OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": GREEDY_TOKENS}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_async_client_streams_and_awaits(server: RunningServer) -> None:
    async def main() -> tuple[str, str]:
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
            whole = await c.chat.completions.create(
                model=MODEL, messages=CHAT, temperature=0, max_tokens=8
            )
            stream = await c.chat.completions.create(
                model=MODEL, messages=CHAT, temperature=0, max_tokens=8, stream=True
            )
            parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
            return whole.choices[0].message.content or "", "".join(parts)

    whole, streamed = asyncio.run(main())
    assert whole and streamed == whole


def test_n2_gives_two_choices_and_counts_both(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, n=2, temperature=1.0, seed=5, max_tokens=8, logprobs=True
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, n=2, temperature=1.0, seed=5, max_tokens=8, stream=True
    )
    texts = {0: "", 1: ""}
    finished = []
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.append(c.index)
    assert sorted(finished) == [0, 1]
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]


def test_batch_of_prompts_and_token_ids(client: OpenAI, reference: dict[str, object]) -> None:
    ids = [int(t) for t in reference["cmpl"].prompt_token_ids]  # type: ignore[attr-defined]
    r = client.completions.create(
        model=MODEL, prompt=[PROMPT, PROMPT], temperature=0, max_tokens=4, n=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) == 1
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=4)
    assert by_ids.choices[0].text == r.choices[0].text
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 16


def test_stop_strings_cut_the_text(client: OpenAI, reference: dict[str, object]) -> None:
    full: str = reference["cmpl"].text  # type: ignore[attr-defined]
    stop = full.split()[2]
    expected = full[: full.index(stop)]
    kwargs = {
        "model": MODEL,
        "prompt": PROMPT,
        "temperature": 0,
        "max_tokens": GREEDY_TOKENS,
        "stop": [stop, "never-appears"],
    }
    r = client.completions.create(**kwargs)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    assert streamed == expected
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=GREEDY_TOKENS, stop="Paris"
    )
    assert chat.choices[0].message.content == "The capital of France is "
    assert chat.choices[0].finish_reason == "stop"


def test_seeds_reproduce_across_calls(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(
            model=MODEL,
            prompt="My favourite animal is the",
            temperature=1.0,
            seed=seed,
            max_tokens=10,
        )
        return r.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, *(sample(s) for s in (1, 2, 3))}) > 1


def test_max_tokens_one(client: OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (1, "length")
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=1, temperature=0
    )
    assert (chat.usage.completion_tokens, chat.choices[0].finish_reason) == (1, "length")
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, stream=True)
    )
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_chat_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.logprob == pytest.approx(tops[0])
        assert bytes(t.bytes).decode() == t.token
    streamed = [
        t
        for c in client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            temperature=0,
            max_tokens=5,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(client: OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2 and logprob <= 0 and top[token] == pytest.approx(logprob)


# -- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1),
        ("top_p", 1.5),
        ("n", 0),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("max_tokens", 0),
        ("top_logprobs", 30),
    ],
)
def test_out_of_range_values_are_400(client: OpenAI, field: str, value: float) -> None:
    kwargs = {"max_tokens": 2, "logprobs": field == "top_logprobs", field: value}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, **kwargs)
    assert err.value.body["param"] == field


def test_bad_messages_are_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.body["param"] == "messages[0].role"


def test_malformed_json_is_400_in_openai_shape(server: RunningServer) -> None:
    for body in (b'{"model": "smollm2-135m", "messages": [', b"[1, 2]", b""):
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_context_length_exceeded(client: OpenAI, llm: LLM) -> None:
    long_prompt = "hello " * 9000
    n = len(llm.tokenizer.encode(long_prompt))
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    assert str(n) in err.value.message and "8192" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # fits alone, not with max_tokens
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8190, stream=True)
    assert err.value.code == "context_length_exceeded" and "8190" in err.value.message


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_body_over_the_limit_is_413(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=MODEL, prompt="x" * (MAX_BODY + 1))
    assert err.value.status_code == 413 and err.value.code == "request_too_large"


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": CHAT, "logit_bias": {"1": 500}},
        {"messages": CHAT, "stream_options": {"include_usage": True}},
        {"messages": CHAT, "seed": 2**70},
        {"messages": CHAT, "stop": [str(i) for i in range(20)]},
        {"messages": CHAT, "temperature": "hot"},
        {"messages": CHAT, "stop_token_ids": [10**9]},
        {"messages": "hello"},
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": [10**9]},
        {"prompt": ""},
        {"prompt": "x", "best_of": 3},
        {"prompt": "x", "echo": True, "logprobs": 21},
    ],
)
def test_odd_requests_are_refused_and_the_server_lives(
    server: RunningServer, body: dict[str, object]
) -> None:
    route = "chat/completions" if "messages" in body else "completions"
    r = httpx.post(f"{server.url}/v1/{route}", json={"model": MODEL, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_text_content_parts_and_extra_fields_are_accepted(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        temperature=0,
        user="alice",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        extra_body={"priority": 3, "top_k": 5, "some_future_field": True},
    )
    assert r.usage.completion_tokens >= 1


def test_nulls_mean_unset_as_clients_send_them(server: RunningServer) -> None:
    body = {
        "model": None,
        "messages": [{"role": "user", "content": "Hi", "name": None}],
        "n": None,
        "stream": None,
        "stop": None,
        "logprobs": None,
        "top_logprobs": None,
        "seed": None,
        "tools": None,
        "response_format": None,
        "max_tokens": 2,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


FUZZ_VALUES: dict[str, list[object]] = {
    "temperature": [0, 0.7, 2, -1, 1e9, "1", None, [1]],
    "top_p": [0.5, 1, 0, 1.5, None],
    "n": [1, 2, 0, -3, 1.5, None],
    "max_tokens": [1, 3, 0, -1, 10**12, "3"],
    "stop": ["\n", ["a", "b"], [], [""], [1], None, "x" * 1000],
    "seed": [0, -5, 2**63, 2**65, "s", None],
    "logprobs": [True, False, 3, -1, None],
    "top_logprobs": [0, 2, 21, -1, None],
    "presence_penalty": [0, 1.5, -3, None],
    "stream": [True, False, None, "yes"],
    "stop_token_ids": [[0], [-1], [10**6], None],
    "priority": [0, -10, 10**30, None],
    "user": ["u", 5, None],
    "messages": [
        CHAT,
        [],
        [{"role": "user"}],
        [{"content": "x"}],
        "hi",
        None,
        [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "y"}]}],
    ],
    "prompt": [PROMPT, "", [1, 2, 3], [[1, 2], "x"], [[]], None, ["a", "b"], [-1], {"a": 1}],
}


def test_fuzzed_requests_never_crash_or_leak(server: RunningServer) -> None:
    rng = random.Random(0)
    kv_idle = metrics(server)["llmos_kv_blocks_used"]
    statuses = set()
    with httpx.Client(base_url=f"{server.url}/v1", timeout=120) as http:
        for i in range(80):
            route = "chat/completions" if i % 2 else "completions"
            body: dict[str, object] = {"model": MODEL, "max_tokens": 2}
            for key in rng.sample(sorted(FUZZ_VALUES), 5):
                body[key] = rng.choice(FUZZ_VALUES[key])
            body.setdefault("messages" if i % 2 else "prompt", CHAT if i % 2 else PROMPT)
            if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:  # type: ignore[operator]
                body["max_tokens"] = 3
            r = http.post(route, json=body)
            statuses.add(r.status_code)
            assert r.status_code in (200, 400), (body, r.text)
            if r.status_code == 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert statuses == {200, 400}
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert wait_for_idle(server, kv_idle)["llmos_kv_blocks_used"] == kv_idle


def test_an_engine_failure_is_500_and_the_server_lives_on(
    client: OpenAI, server: RunningServer, llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated device failure")

    kv_idle = metrics(server)["llmos_kv_blocks_used"]
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    monkeypatch.setattr(llm.engine.runner, "run", broken)
    with pytest.raises(openai.APIError, match="simulated device failure"):
        for _ in stream:
            pass
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert err.value.body["type"] == "server_error"
    monkeypatch.undo()
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert wait_for_idle(server, kv_idle)["llmos_kv_blocks_used"] == kv_idle


# -- load and disconnects ----------------------------------------------------------------------
def test_32_concurrent_streams(server: RunningServer) -> None:
    before = metrics(server).get('llmos_requests_total{status="200"}', 0)

    async def one(c: AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        stream = await c.completions.create(
            model=MODEL,
            prompt=f"Fact number {i} about the number {i * 7}:",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, reason, usage = "", None, -1
        async for chunk in stream:
            for ch in chunk.choices:
                text += ch.text
                reason = ch.finish_reason or reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, reason, usage

    async def main() -> list[tuple[str, str | None, int]]:
        async with AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300
        ) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    assert all(text and reason == "length" and usage == 6 for text, reason, usage in results)
    assert metrics(server)['llmos_requests_total{status="200"}'] == before + 32


def test_20_streams_dropped_midway_give_their_kv_blocks_back(server: RunningServer) -> None:
    m0 = metrics(server)
    kv_idle, dropped0 = m0["llmos_kv_blocks_used"], m0.get('llmos_requests_total{status="499"}', 0)
    busy: list[float] = []

    async def main() -> None:
        async with AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300
        ) as c:
            streams = await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": f"Count to {i + 50}."}],
                        max_tokens=250,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    for i in range(20)
                )
            )
            for s in streams:
                got = 0
                async for chunk in s:
                    got += bool(chunk.choices and chunk.choices[0].delta.content)
                    if got == 2:
                        break
            busy.append(metrics(server)["llmos_kv_blocks_used"])
            for s in streams:
                await s.close()

    asyncio.run(main())
    assert busy[0] > kv_idle  # the streams held blocks while open
    m = wait_for_idle(server, kv_idle, min_499=dropped0 + 20)
    assert m["llmos_kv_blocks_used"] == kv_idle
    assert m['llmos_requests_total{status="499"}'] == dropped0 + 20


def test_a_dropped_non_streaming_request_is_aborted(server: RunningServer) -> None:
    kv_idle = metrics(server)["llmos_kv_blocks_used"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            timeout=2.0,
            json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True},
        )
    assert wait_for_idle(server, kv_idle)["llmos_kv_blocks_used"] == kv_idle


def test_a_client_that_leaves_while_queued_is_aborted(server: RunningServer) -> None:
    """Gone before its first token (a long prefill): aborted then, not after the first token."""
    kv_idle = metrics(server)["llmos_kv_blocks_used"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            timeout=0.5,
            json={
                "model": MODEL,
                "prompt": "hello " * 4000,
                "max_tokens": 1500,
                "ignore_eos": True,
            },
        )
    assert wait_for_idle(server, kv_idle)["llmos_kv_blocks_used"] == kv_idle


def test_metrics_count_tokens_and_latencies(server: RunningServer, client: OpenAI) -> None:
    before = metrics(server)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    m = metrics(server)
    assert (
        m["llmos_prompt_tokens_total"] - before["llmos_prompt_tokens_total"]
        == r.usage.prompt_tokens
    )
    assert m["llmos_generation_tokens_total"] - before["llmos_generation_tokens_total"] == 3
    assert (
        m["llmos_time_to_first_token_seconds_count"]
        == before["llmos_time_to_first_token_seconds_count"] + 1
    )
    assert (
        m["llmos_inter_token_latency_seconds_count"]
        >= before["llmos_inter_token_latency_seconds_count"] + 2
    )
    assert m["llmos_kv_blocks_total"] > 0
    assert (
        m['llmos_requests_total{status="400"}']
        == before.get('llmos_requests_total{status="400"}', 0) + 1
    )
