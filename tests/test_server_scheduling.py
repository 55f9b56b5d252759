"""Issue 4 over HTTP: prefix-cache metrics, priority scheduling, deterministic mode."""

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


def counters(url: str, response: httpx.Response | None = None) -> dict[str, float]:
    text = (response or httpx.get(f"{url}/metrics")).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_prefix_cache_metrics(llm: LLM) -> None:
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
            )
        after = counters(server.url)
        queried = (
            after["llmos_prefix_cache_queries_total"] - before["llmos_prefix_cache_queries_total"]
        )
        hits = after["llmos_prefix_cache_hits_total"] - before["llmos_prefix_cache_hits_total"]
        assert hits >= 100  # the second request reused the shared system prompt
        assert queried > hits


async def _first_token_order(url: str, late_priority: int) -> list[str]:
    """With the engine's one batch slot taken, three requests queue at priority 0, then a late
    one at `late_priority`: the names of the four, in the order their first tokens came."""
    order: list[str] = []
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300) as c:

        async def one(name: str, priority: int, max_tokens: int = 3) -> None:
            stream = await c.completions.create(
                model="smollm2-135m",
                prompt=f"Request {name} says:",
                max_tokens=max_tokens,
                stream=True,
                user="same-user",  # no fair-share reordering between users
                extra_body={"priority": priority, "ignore_eos": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and name not in order:
                    order.append(name)

        async def waiting() -> float:
            async with httpx.AsyncClient() as http:
                return counters(url, await http.get(f"{url}/metrics"))["llmos_num_requests_waiting"]

        async def until_waiting(n: int) -> None:
            while await waiting() < n:
                await asyncio.sleep(0.02)

        blocker = asyncio.create_task(one("blocker", 0, max_tokens=40))
        while "blocker" not in order:
            await asyncio.sleep(0.02)
        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(one(f"low{i}", 0)))
            await asyncio.wait_for(until_waiting(i + 1), 60)  # queued in this order
        tasks.append(asyncio.create_task(one("late", late_priority)))
        await asyncio.gather(blocker, *tasks)
    return order[1:]


def test_a_higher_priority_request_is_scheduled_first() -> None:
    """One batch slot (max_num_seqs=1), so requests wait in the scheduler's queue: the late
    request jumps the three queued before it only when its `priority` is higher."""
    one_slot = LLM(max_num_seqs=1, kv_cache_memory="64MiB")
    with serve_in_thread(create_app(AsyncEngine(one_slot.engine), ServerConfig())) as server:
        fifo = asyncio.run(_first_token_order(server.url, late_priority=0))
        assert fifo == ["low0", "low1", "low2", "late"]
        jumped = asyncio.run(_first_token_order(server.url, late_priority=5))
        assert jumped == ["late", "low0", "low1", "low2"]


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
