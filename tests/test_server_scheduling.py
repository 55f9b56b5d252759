"""Issue 4 over HTTP: prefix-cache metrics, priority as an extra body field, deterministic mode."""

from __future__ import annotations

import asyncio

import httpx
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.server.app import create_app
from llmos.server.launch import serve_in_thread
from llmos.server.state import ServerConfig

SYSTEM = "You are a helpful assistant for an operating system course. " * 12


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_prefix_cache_metrics_and_priority(llm: LLM) -> None:
    with serve_in_thread(create_app(AsyncEngine(llm.engine), ServerConfig())) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        before = counters(server.url)
        for question in ("What is paging?", "What is a process?"):
            client.chat.completions.create(
                model="smollm2-135m",
                max_tokens=4,
                temperature=0,
                messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": question},
                ],
                extra_body={"priority": 3},
            )
        after = counters(server.url)
        queried = (
            after["llmos_prefix_cache_queries_total"] - before["llmos_prefix_cache_queries_total"]
        )
        hits = after["llmos_prefix_cache_hits_total"] - before["llmos_prefix_cache_hits_total"]
        assert hits >= 100  # the second request reused the shared system prompt
        assert queried > hits


def test_deterministic_server_gives_the_same_logprobs_under_load() -> None:
    det = LLM(deterministic=True, kv_cache_memory="64MiB")
    with serve_in_thread(create_app(AsyncEngine(det.engine), ServerConfig())) as server:
        kwargs = dict(
            model="smollm2-135m",
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            messages=[{"role": "user", "content": "Name a planet."}],
        )
        client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        alone = client.chat.completions.create(**kwargs)

        async def crowd() -> list:
            aclient = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
            others = [
                aclient.chat.completions.create(
                    model="smollm2-135m",
                    max_tokens=12,
                    temperature=0.9,
                    seed=i,
                    messages=[
                        {"role": "user", "content": f"Tell me about the number {i}." * (i + 1)}
                    ],
                )
                for i in range(6)
            ]
            results = await asyncio.gather(aclient.chat.completions.create(**kwargs), *others)
            await aclient.close()
            return results

        loaded = asyncio.run(crowd())[0]
        a = [(t.token, t.logprob) for t in alone.choices[0].logprobs.content]
        b = [(t.token, t.logprob) for t in loaded.choices[0].logprobs.content]
        assert a == b
