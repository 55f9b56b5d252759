"""Schemathesis on the kernel's routes (/v1/processes, /v1/usage) of a real server hosting a
kernel on a small-context engine, with the pass mark of test_server_fuzz.py: no 500, no hang,
every 4xx in OpenAI's error shape, every stream ending in [DONE], every KV block back."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from test_server_fuzz import CALL_TIMEOUT, _runner  # its runner and pass mark (check_response)

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.kernel import Program
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.processes_host import ProcessHost
from llmos.server.state import ServerConfig

EXAMPLES = int(os.environ.get("LLMOS_FUZZ_EXAMPLES", "25"))
MAX_MODEL_LEN = 96


@pytest.fixture(scope="module")
def small_llm() -> LLM:
    return LLM(kv_cache_memory="32MiB", max_model_len=MAX_MODEL_LEN, max_num_seqs=8)


@pytest.fixture(scope="module")
def server(small_llm: LLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = AsyncEngine(small_llm.engine)
    quick = Program(name="quick", sampling={"temperature": 0, "max_tokens": 4})
    host = ProcessHost.on_engine(
        engine,
        tmp_path_factory.mktemp("kernel") / "kernel.db",
        workspace_root=tmp_path_factory.mktemp("workspaces"),
        programs={"quick": lambda: quick},
    )
    with serve_in_thread(create_app(engine, ServerConfig(max_body_bytes=64 * 1024), host)) as s:
        yield s


def test_schemathesis_on_the_kernel_routes(server: RunningServer, small_llm: LLM) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    statuses: Counter[int] = Counter()
    counts: dict[str, int] = {}
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=CALL_TIMEOUT) as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            if not operation.path.startswith(("/v1/processes", "/v1/usage")):
                continue
            for mode in GenerationMode:
                label = f"{operation.label} [{mode.value}]"
                counts[label] = 0

                def sent(status: int, label: str = label) -> None:
                    counts[label] += 1
                    statuses[status] += 1

                strategy = operation.as_strategy(generation_mode=mode)
                _runner(http, server.url, strategy, EXAMPLES)(sent)
    print(f"\nschemathesis: {sum(counts.values())} cases in {time.monotonic() - started:.1f} s")
    print(f"  statuses: {dict(sorted(statuses.items()))}")
    assert len({label.split(" [")[0] for label in counts}) == 8, counts
    assert all(n > 0 for label, n in counts.items() if "POST" in label), counts
    # every process the cases started ends; then every KV block is back
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=f"{server.url}/v1", timeout=30) as c:
        while any(p["status"] not in ("done", "failed", "killed") for p in _all(c)):
            assert time.monotonic() < deadline, "processes still running after the fuzzing"
            time.sleep(0.2)
    while small_llm.engine.has_unfinished_requests() or small_llm.engine.blocks.num_used:
        assert time.monotonic() < deadline, "KV blocks held after the fuzzing"
        time.sleep(0.1)


def _all(c: httpx.Client) -> list[dict]:
    return c.get("/processes", params={"limit": 1000}).json()["data"]
