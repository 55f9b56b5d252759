"""Speculative decoding over HTTP, through the official `openai` client: the per-request
`speculation` extra, the drafts in the response's usage, and vLLM's counters on /metrics."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from llmos.engine.async_engine import AsyncEngine
from llmos.engine.llm_engine import LLMEngine
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.state import ServerConfig

MODEL = "smollm2-135m"
PROMPT = "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3,"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    engine = AsyncEngine(lambda: LLMEngine(speculation="suffix", kv_cache_memory="128MiB"))
    app = create_app(engine, ServerConfig())
    with serve_in_thread(app) as running:
        yield running
    engine.shutdown()


@pytest.fixture
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _counters(server: RunningServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vllm:spec_decode")
    }


def test_usage_metrics_and_the_per_request_switch(client: OpenAI, server: RunningServer) -> None:
    before = _counters(server)
    on = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0)
    spec = on.usage.model_extra["speculation"]
    assert spec["num_drafts"] > 0 and spec["num_accepted_tokens"] > 0
    assert spec["mean_acceptance_length"] == round(
        1 + spec["num_accepted_tokens"] / spec["num_drafts"], 3
    )
    after = _counters(server)
    for key, name in (
        ("num_drafts", "vllm:spec_decode_num_drafts_total"),
        ("num_draft_tokens", "vllm:spec_decode_num_draft_tokens_total"),
        ("num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_total"),
    ):
        assert after[name] - before.get(name, 0) == spec[key], name
    off = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=32,
        temperature=0,
        extra_body={"speculation": False},
    )
    assert off.usage.model_extra["speculation"]["num_drafts"] == 0
    assert off.choices[0].text == on.choices[0].text  # lossless
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Continue: {PROMPT}"}],
        max_tokens=24,
        temperature=0,
    )
    assert "speculation" in chat.usage.model_extra


def test_a_bad_speculation_value_is_400_naming_it(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"speculation": "sometimes"}
        )
    assert "speculation" in str(info.value)
