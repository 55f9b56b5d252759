"""`/metrics` on a real server with the real model: the GenAI histograms, the vLLM-compatible
aliases beside the llmos_ metrics, and the kernel's metrics read from a real kernel DB."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from llmos import LLM, SamplingParams
from llmos.backends.scripted import ScriptedBackend, call
from llmos.engine.async_engine import AsyncEngine
from llmos.kernel import Kernel, Program, Status, tool
from llmos.kernel.meter import Price
from llmos.server.app import create_app, server_state
from llmos.server.launch import RunningServer, serve_in_thread


@tool(name="slow_lookup", read_only=True)
def slow_lookup(key: str) -> str:
    """Look a key up (slowly)."""
    time.sleep(0.3)
    return f"{key}=1"


@pytest.fixture(scope="module")
def kernel_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernel DB with a finished tool-using process (ann), a plain one (bob), a failed one."""
    db = tmp_path_factory.mktemp("kernel") / "k.db"
    ws = db.parent / "ws"
    ws.mkdir()
    prices = {"scripted": Price(completion_per_mtok=1e6)}  # $1 per completion token
    turns = [{"tool_calls": [call("slow_lookup", key="a")]}, {"content": "a is 1"}]
    with Kernel(db=db, prices=prices) as kernel:
        kernel.backend = ScriptedBackend(turns)
        prog = Program(name="looker", tools=[slow_lookup])
        assert kernel.wait(kernel.spawn(prog, "a?", user="ann", workspace=ws), 30).status is (
            Status.DONE
        )
        kernel.backend = ScriptedBackend([{"content": "hi", "usage": {"completion_tokens": 3}}])
        assert kernel.wait(kernel.spawn(Program(), "hi", user="bob", workspace=ws), 30).answer
        kernel.backend = ScriptedBackend([{"raise": "down"}])
        assert kernel.wait(kernel.spawn(Program(), "x", user="bob", workspace=ws), 30).status is (
            Status.FAILED
        )
    return db


@pytest.fixture(scope="module")
def engine(llm: LLM) -> AsyncEngine:
    return AsyncEngine(llm.engine)


@pytest.fixture(scope="module")
def server(engine: AsyncEngine, kernel_db: Path) -> Iterator[RunningServer]:
    app = create_app(engine)
    server_state(app).metrics.watch_kernel(str(kernel_db))
    with serve_in_thread(app) as running:
        yield running


def scrape(server: RunningServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}"""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def one(samples: dict, name: str, **labels: str) -> float:
    rows = samples[name]
    hits = [v for k, v in rows.items() if all((key, val) in k for key, val in labels.items())]
    assert len(hits) == 1, (name, labels, rows)
    return hits[0]


def test_genai_and_vllm_metrics_follow_the_requests(server: RunningServer) -> None:
    before = scrape(server)
    with OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        chat = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8,
            temperature=0,
        )
        cmpl = client.completions.create(
            model="smollm2-135m", prompt="One, two, three,", max_tokens=5, temperature=0
        )
    after = scrape(server)
    model = chat.model
    prompt = chat.usage.prompt_tokens + cmpl.usage.prompt_tokens
    generated = chat.usage.completion_tokens + cmpl.usage.completion_tokens

    def delta(name: str, **labels: str) -> float:
        now = one(after, name, **labels)
        rows = before.get(name, {})
        old = [v for k, v in rows.items() if all((a, b) in k for a, b in labels.items())]
        return now - (old[0] if old else 0.0)

    # llmos_ metrics are kept
    assert delta("llmos_prompt_tokens_total") == prompt
    assert delta("llmos_generation_tokens_total") == generated
    # GenAI histograms, by operation
    for op in ("chat", "text_completion"):
        assert (
            delta("gen_ai_server_time_to_first_token_seconds_count", gen_ai_operation_name=op) == 1
        )
        assert delta("gen_ai_server_request_duration_seconds_count", gen_ai_operation_name=op) == 1
        assert delta("gen_ai_server_time_per_output_token_seconds_count", gen_ai_operation_name=op)
    ttft = one(after, "gen_ai_server_time_to_first_token_seconds_sum", gen_ai_operation_name="chat")
    duration = one(
        after, "gen_ai_server_request_duration_seconds_sum", gen_ai_operation_name="chat"
    )
    assert 0 < ttft < duration
    assert one(
        after,
        "gen_ai_server_time_to_first_token_seconds_count",
        gen_ai_operation_name="chat",
        gen_ai_provider_name="llmos",
        gen_ai_request_model=model,
    )
    assert (
        delta(
            "gen_ai_client_token_usage_sum", gen_ai_operation_name="chat", gen_ai_token_type="input"
        )
        == chat.usage.prompt_tokens
    )
    assert (
        delta(
            "gen_ai_client_token_usage_sum",
            gen_ai_token_type="output",
            gen_ai_operation_name="chat",
        )
        == chat.usage.completion_tokens
    )
    # vLLM's names and labels
    assert delta("vllm:prompt_tokens_total", model_name=model) == prompt
    assert delta("vllm:generation_tokens_total", model_name=model) == generated
    assert delta("vllm:time_to_first_token_seconds_count", model_name=model) == 2
    assert delta("vllm:e2e_request_latency_seconds_count", model_name=model) == 2
    assert 0 < delta("vllm:inter_token_latency_seconds_count", model_name=model) <= generated - 2
    assert delta("vllm:request_success_total", model_name=model, finished_reason="length") >= 1
    assert one(after, "vllm:num_requests_running", model_name=model) == 0
    assert one(after, "vllm:num_requests_waiting", model_name=model) == 0
    assert 0 <= one(after, "vllm:kv_cache_usage_perc", model_name=model) <= 1
    queries = one(after, "vllm:prefix_cache_queries_total", model_name=model)
    assert queries == one(after, "llmos_prefix_cache_queries_total") > 0
    assert one(after, "vllm:prefix_cache_hits_total", model_name=model) <= queries


def test_kernel_metrics_from_its_db(server: RunningServer, engine: AsyncEngine) -> None:
    m = scrape(server)
    assert one(m, "llmos_kernel_processes", state="done") == 2
    assert one(m, "llmos_kernel_processes", state="failed") == 1
    assert one(m, "llmos_kernel_processes", state="running") == 0
    assert one(m, "llmos_kernel_tool_wait_seconds_total", program="looker") >= 0.3
    assert one(m, "llmos_kernel_cost_total", user="ann") == 20  # 2 turns x 10 tokens x $1
    assert one(m, "llmos_kernel_cost_total", user="bob") == 3
    assert one(m, "llmos_kernel_tokens_total", user="bob", type="completion") == 3

    # KV blocks pinned per process: a turn retained under the kernel's key for pid 7
    async def retained_turn() -> None:
        params = SamplingParams(temperature=0, max_tokens=2)
        async for _ in engine.generate("The sky is blue. " * 8, params, retain="p7"):
            pass

    asyncio.run(retained_turn())
    try:
        pinned = one(scrape(server), "llmos_kernel_kv_blocks_pinned", pid="7")
        assert pinned == one(scrape(server), "llmos_kv_blocks_pinned") > 0
    finally:
        engine.release("p7")
        engine.call(lambda _: None).result(30)  # the release has happened
    assert ("pid", "7") not in {
        k for row in scrape(server).get("llmos_kernel_kv_blocks_pinned", {}) for k in row
    }
