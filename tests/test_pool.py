"""The backend pool under faults, over loopback HTTP only: a real `llmos serve` (the embedded
model) and small FastAPI fakes that return 500, return 429 with Retry-After, die mid-response,
hang, or refuse a long prompt. Each fake records when each call arrived, so "no call reached a
cooling backend" and "the cooldown held within 10%" are checked on the fake's side.

The breaker's state machine and the all-cooling wait run on an injected clock (exact, fast)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from llmos import LLM, Kernel, Program
from llmos.backends import resolve
from llmos.backends.base import ChatRequest
from llmos.backends.breaker import Breaker
from llmos.backends.openai_http import OpenAIHTTPBackend
from llmos.backends.pool import (
    Member,
    Pool,
    PoolConfig,
    PoolCoolingError,
    PoolError,
)
from llmos.backends.scripted import ScriptedBackend
from llmos.engine.async_engine import AsyncEngine
from llmos.kernel.meter import DEFAULT_PRICES, Meter, Price
from llmos.kernel.store import Store
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, bind, serve_in_thread, url_of

HI = ChatRequest([{"role": "user", "content": "Say hi."}], sampling={"max_tokens": 4})


@dataclass
class Fake:
    """A fake OpenAI server's behaviour: `script` modes are used one per call, then `mode`."""

    mode: str = "ok"
    script: list[str] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)  # time.monotonic() at each arrival


FAKES: dict[str, Fake] = {}


def completion(name: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"hello from {name}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def error(status: int, message: str, code: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def fake_app() -> FastAPI:
    app = FastAPI()

    @app.post("/{name}/v1/chat/completions")
    async def chat(name: str, request: Request) -> Any:
        fake = FAKES[name]
        fake.calls.append(time.monotonic())
        mode = fake.script.pop(0) if fake.script else fake.mode
        if mode == "ok":
            return completion(name)
        if mode == "500":
            return error(500, "the fake is broken")
        if mode.startswith("429"):
            return error(429, "slow down", "rate_limit_exceeded", **{"Retry-After": mode[4:]})
        if mode == "400":
            return error(400, "temperature: bad value", "invalid_request")
        if mode == "die":

            async def body() -> Any:
                yield b'{"id": "chatcmpl-fake", "choices": [{"index": 0, "mess'
                raise RuntimeError("the fake died mid-response (this traceback is expected)")

            return StreamingResponse(body(), media_type="application/json")
        if mode == "slow":
            await asyncio.sleep(0.3)
            return completion(name)
        if mode == "hang":
            for _ in range(200):  # until the client gives up (at most 10 s)
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.05)
            return completion(name)
        raise AssertionError(mode)

    return app


@dataclass
class FakeServer:
    url: str


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeServer]:
    """Plain uvicorn on a free loopback port, on a thread."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(fake_app(), log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake did not start"
        time.sleep(0.02)
    yield FakeServer(url_of(sock))
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def real(llm: LLM) -> Iterator[RunningServer]:
    """`llmos serve` on the embedded model."""
    with serve_in_thread(create_app(AsyncEngine(llm.engine))) as running:
        yield running


def fake(server: FakeServer, name: str, mode: str = "ok", *script: str, **kw: Any) -> Member:
    FAKES[name] = Fake(mode, list(script))
    return Member(OpenAIHTTPBackend(f"{server.url}/{name}/v1", name), **kw)


def llmos_serve(server: RunningServer, **kw: Any) -> Member:
    return Member(OpenAIHTTPBackend(f"{server.url}/v1", "smollm2-135m"), **kw)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def open_intervals(pool: Pool, name: str) -> list[tuple[float, float]]:
    """When a member's breaker was open: (opened, the end of its cooldown)."""
    m = pool.member(name)
    assert m is not None and m.breaker is not None
    return [(at, at + m.breaker.cooldown) for state, at in m.breaker.history if state == "open"]


def calls_while_open(pool: Pool, name: str, fake_name: str) -> list[float]:
    return [
        t
        for t in FAKES[fake_name].calls
        for start, end in open_intervals(pool, name)
        if start < t < end
    ]


# --- the faults, with the real model as the healthy member --------------------------------


@pytest.mark.parametrize("mode", ["500", "die", "hang", "429:30"])
def test_a_failing_member_fails_no_request(
    fakes: FakeServer, real: RunningServer, mode: str
) -> None:
    """Sequential then concurrent requests, the broken member first in preference: every
    request is answered by llmos serve, and the broken one sees no call while it cools."""
    name = f"broken{mode.replace(':', '')}"
    broken = fake(fakes, name, mode, timeout=0.3)
    pool = Pool([broken, llmos_serve(real)], PoolConfig(failures=2, cooldown=30, retries=1))
    results = run(_many(pool, sequential=4, concurrent=6))
    assert [r.backend for r in results] == [pool.members[1].name] * 10  # 0 failed requests
    assert all(r.content for r in results)
    calls = len(FAKES[name].calls)
    if mode.startswith("429"):
        assert calls == 1  # Retry-After: 30 blocks it for every later request
        assert pool.health()[0]["state"] == "rate_limited"
    else:
        assert calls == 2  # the second failure in a row opened its breaker
        assert pool.health()[0]["state"] == "cooling"
    assert calls_while_open(pool, broken.name, name) == []


async def _many(pool: Pool, sequential: int, concurrent: int) -> list[Any]:
    try:
        out = [await pool.chat(HI) for _ in range(sequential)]
        return out + list(await asyncio.gather(*(pool.chat(HI) for _ in range(concurrent))))
    finally:
        await pool.aclose()


def test_every_fault_at_once(fakes: FakeServer, real: RunningServer) -> None:
    """500, 429, a mid-response death and a hang ahead of one healthy backend: 12 concurrent
    requests, 0 failures, and each broken member's calls stop once its breaker opens."""
    names = ["all500", "all429", "alldie", "allhang"]
    modes = ["500", "429:30", "die", "hang"]
    members = [fake(fakes, n, m, timeout=0.5) for n, m in zip(names, modes, strict=True)]
    pool = Pool([*members, llmos_serve(real)], PoolConfig(failures=1, cooldown=30, retries=0))
    results = run(_many(pool, sequential=2, concurrent=10))
    assert {r.backend for r in results} == {pool.members[-1].name}
    for m, n in zip(members, names, strict=True):
        assert calls_while_open(pool, m.name, n) == []
    # the first request met every fault in turn; the second sent nothing to a broken member
    assert all(len(FAKES[n].calls) == 1 for n in names), {n: FAKES[n].calls for n in names}


# --- cooldowns, probes, Retry-After: timed on the fake --------------------------------------


async def drive(pool: Pool, seconds: float) -> list[tuple[float, str]]:
    """Requests one after another for `seconds`: (when each started, who answered)."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        out.append((t, (await pool.chat(HI)).backend or ""))
        await asyncio.sleep(0.005)
    await pool.aclose()
    return out


def sent_to(pool: Pool, name: str) -> list[float]:
    """When the pool sent each of its attempts to a member (its log, in order)."""
    return [a.started for a in pool.log if a.member == name]


def first_after(seen: list[tuple[float, str]], at: float) -> tuple[float, str]:
    return next((t, who) for t, who in seen if t >= at)


def cadence(seen: list[tuple[float, str]]) -> float:
    """The longest gap between two requests' starts: how late a comeback can be seen."""
    return max(b[0] - a[0] for a, b in zip(seen, seen[1:], strict=False))


def test_cooldown_then_half_open_probe_within_10_percent(fakes: FakeServer) -> None:
    """failures=1, cooldown=0.6: after a 500 the member gets no call for 0.6 s (requests go to
    the fallback meanwhile); the first request after 0.6 s is its probe, which closes it."""
    flaky = fake(fakes, "flaky", "ok", "500")
    backup = fake(fakes, "backup")
    pool = Pool([flaky, backup], PoolConfig(failures=1, cooldown=0.6, retries=0))
    seen = run(drive(pool, 1.2))
    ((opened, end),) = open_intervals(pool, flaky.name)
    assert {who for t, who in seen if t < end} == {backup.name}
    assert first_after(seen, end)[1] == flaky.name  # the probe, at once
    _, probe = FAKES["flaky"].calls[:2]
    assert probe - opened >= 0.6  # on the fake's side: no call sooner
    sent = sent_to(pool, flaky.name)[1] - opened  # on the pool's side: sent within 10%
    assert 0.6 <= sent <= 0.6 + max(0.06, cadence(seen)), sent
    assert seen[-1][1] == flaky.name  # back in service
    assert len(FAKES["backup"].calls) == sum(who == backup.name for _, who in seen) > 10
    assert [state for state, _ in flaky.breaker.history] == ["open", "half_open", "closed"]


def test_failed_probe_cools_again(fakes: FakeServer) -> None:
    bad = fake(fakes, "stillbad", "500")
    good = fake(fakes, "good2")
    pool = Pool([bad, good], PoolConfig(failures=1, cooldown=0.4, retries=0))
    seen = run(drive(pool, 1.5))
    assert {who for _, who in seen} == {good.name}
    calls = FAKES["stillbad"].calls
    ends = [end for _, end in open_intervals(pool, bad.name)]
    assert len(calls) == len(ends) >= 3  # at 0, then a probe after each 0.4 s, each failing
    late = [sent - end for sent, end in zip(sent_to(pool, bad.name)[1:], ends, strict=False)]
    assert all(0 <= x <= max(0.04, cadence(seen)) + 0.02 for x in late), late
    assert calls_while_open(pool, bad.name, "stillbad") == []


def test_429_retry_after_is_honoured_by_the_only_member(fakes: FakeServer) -> None:
    """One member: a 429 with Retry-After: 0.8 makes the request wait 0.8 s (not the 0.05 s
    backoff), then it is answered by that member."""
    only = fake(fakes, "limited", "ok", "429:0.8")
    pool = Pool([only], PoolConfig(backoff=0.05, retries=2))
    result = run(pool.chat(HI))
    assert result.backend == only.name
    first, second = FAKES["limited"].calls
    assert second - first >= 0.8  # on the server's side: nothing came sooner
    limited, answered = pool.log  # on the pool's side: it sent the retry within 10%
    assert limited.outcome == "rate_limit" and answered.action == "answered"
    assert 0.8 <= answered.started - limited.at <= 0.88, answered.started - limited.at


def test_429_sends_the_others_then_comes_back(fakes: FakeServer) -> None:
    limited = fake(fakes, "limited2", "ok", "429:0.5")
    other = fake(fakes, "other2")
    pool = Pool([limited, other], PoolConfig(retries=2))
    seen = run(drive(pool, 0.9))
    first, second = FAKES["limited2"].calls[:2]
    assert seen[0][1] == other.name and seen[-1][1] == limited.name
    assert {who for t, who in seen if t < first + 0.5} == {other.name}  # none to it meanwhile
    assert second - first >= 0.5
    limited_at = pool.log[0].at  # the 429 came back; the pool sent to it again after 0.5 s
    again = sent_to(pool, limited.name)[1] - limited_at
    assert 0.5 <= again <= 0.5 + max(0.05, cadence(seen)), again


def test_all_cooling_fail_is_immediate_and_sends_nothing(fakes: FakeServer) -> None:
    a, b = fake(fakes, "dead1", "500"), fake(fakes, "dead2", "500")
    pool = Pool([a, b], PoolConfig(failures=1, cooldown=30, when_all_cooling="fail"))
    with pytest.raises(PoolError):
        run(pool.chat(HI))
    t0 = time.monotonic()
    with pytest.raises(PoolCoolingError, match=r"every backend is cooling down .*dead1.*: cooling"):
        run(pool.chat(HI))
    assert time.monotonic() - t0 < 0.05
    assert len(FAKES["dead1"].calls) == len(FAKES["dead2"].calls) == 1


def test_all_cooling_wait_is_bounded_by_max_wait(fakes: FakeServer) -> None:
    a = fake(fakes, "dead3", "500")
    pool = Pool([a], PoolConfig(failures=1, cooldown=30, retries=0, max_wait=0.3))
    with pytest.raises(PoolError):
        run(pool.chat(HI))
    t0 = time.monotonic()
    with pytest.raises(PoolCoolingError, match=r"no backend is ready within max_wait=0.3s"):
        run(pool.chat(HI))
    assert time.monotonic() - t0 < 0.05  # 30 s of cooldown is past the limit: no waiting
    assert len(FAKES["dead3"].calls) == 1


# --- fallbacks on context, and errors that must not fall back ----------------------------


def test_context_overflow_falls_back_to_a_longer_window(
    fakes: FakeServer, real: RunningServer
) -> None:
    """llmos serve (8192 tokens) refuses a long prompt with 400 context_length_exceeded (its
    window is overstated here, so the pool sends it); the pool falls back to the long-context
    member without counting it against llmos serve's health. A member whose window is known to
    be too small is skipped without a call."""
    small = fake(fakes, "small", context_window=64)
    longer = fake(fakes, "longctx", context_window=100_000)
    pool = Pool([small, llmos_serve(real, context_window=90_000), longer])
    long_prompt = ChatRequest(
        [{"role": "user", "content": "word " * 9000}], sampling={"max_tokens": 4}
    )
    result = run(pool.chat(long_prompt))
    assert result.backend == longer.name
    assert FAKES["small"].calls == []
    assert pool.members[1].calls == 1 and pool.members[1].failures == 0
    assert pool.log[-2].outcome == "context" and pool.log[-2].action == "fallback"
    assert pool.context_window == 100_000
    assert run(pool.chat(HI)).backend == small.name  # a short prompt still fits the first


def test_a_timed_out_call_gives_its_kv_blocks_back(
    llm: LLM, fakes: FakeServer, real: RunningServer
) -> None:
    """llmos serve is too slow for its 0.2 s timeout on a long answer: the pool falls back, and
    the abandoned request is aborted in the engine, its KV blocks back."""
    slow = llmos_serve(real, timeout=0.2)
    backup = fake(fakes, "kvbackup")
    pool = Pool([slow, backup], PoolConfig(retries=0))
    story = ChatRequest(
        [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
        sampling={"max_tokens": 400, "temperature": 0},
    )
    left_before = client_left(real)
    assert run(pool.chat(story)).backend == backup.name
    assert pool.log[-2].outcome == "timeout" and slow.failures == 1
    deadline = time.monotonic() + 30
    while llm.engine.has_unfinished_requests() or llm.engine.blocks.num_used:
        assert time.monotonic() < deadline, "the abandoned request kept its KV blocks"
        time.sleep(0.05)
    while client_left(real) == left_before:  # the server saw the client leave (a 499)
        assert time.monotonic() < deadline
        time.sleep(0.05)


def client_left(server: RunningServer) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llmos_requests_total" and s.labels.get("status") == "499"
    )


def test_bad_request_fails_without_fallback(fakes: FakeServer) -> None:
    bad = fake(fakes, "picky", "400")
    other = fake(fakes, "unused")
    pool = Pool([bad, other])
    with pytest.raises(PoolError, match="bad_request is not retried"):
        run(pool.chat(HI))
    assert FAKES["unused"].calls == [] and bad.failures == 0


# --- the breaker and the all-cooling wait on an injected clock --------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_breaker_states_exactly() -> None:
    clock = Clock()
    b = Breaker(failures=2, cooldown=5.0, clock=clock)
    assert b.acquire() and (b.failure() or True) and b.health() == "healthy"
    assert b.acquire()
    b.failure()
    assert b.health() == "cooling" and not b.acquire() and b.ready_at() == 105.0
    clock.now = 104.999
    assert not b.acquire()
    clock.now = 105.0
    assert b.health() == "half_open" and b.acquire()  # one probe
    assert not b.acquire() and b.ready_at() is None  # no second while it is in flight
    b.failure()  # the probe failed: cool again, from now
    assert b.health() == "cooling" and b.ready_at() == 110.0
    clock.now = 110.0
    assert b.acquire()
    b.success()
    assert b.health() == "healthy" and b.acquire() and b.acquire()
    b.block(2.0)
    assert b.health() == "rate_limited" and not b.acquire()


def test_waiting_for_a_cooling_member_sleeps_once_exactly() -> None:
    """Every member cooling, when_all_cooling=wait: one sleep of exactly the time left, no
    polling, then the probe answers."""
    clock = Clock()
    turns: list[dict[str, Any]] = [{"raise": "down"}, {"content": "back"}]
    backend = ScriptedBackend(lambda req: turns.pop(0), name="s1")
    pool = Pool(
        [Member(backend, policy={"other": "retry"})],
        PoolConfig(failures=1, cooldown=7.5, retries=3, backoff=0.25),
        clock=clock,
        sleep=clock.sleep,
    )
    result = run(pool.chat(HI))
    assert result.content == "back" and result.backend == "s1"
    assert clock.sleeps == [7.5]


def test_a_probe_in_flight_makes_others_wait_for_its_end(fakes: FakeServer) -> None:
    """Half-open admits one probe; a second request meanwhile is not sent, it waits for the
    probe's end (woken then, not polling and not sleeping out max_wait) and is answered."""
    m = fake(fakes, "halfopen", "ok", "500", "slow")
    pool = Pool([m], PoolConfig(failures=1, cooldown=0.2, retries=0, max_wait=5))

    async def go() -> list[Any]:
        with pytest.raises(PoolError, match="every member failed"):
            await pool.chat(HI)
        await asyncio.sleep(0.25)  # cooled: half-open
        probe = asyncio.create_task(pool.chat(HI))
        await asyncio.sleep(0.05)
        return list(await asyncio.gather(probe, pool.chat(HI)))

    results = run(go())
    assert [r.backend for r in results] == [m.name, m.name]
    _, probe, second = FAKES["halfopen"].calls
    assert second - probe >= 0.3  # not sent while the probe (0.3 s on the fake) was out
    _, probed, woken = [a for a in pool.log if a.member == m.name]
    assert 0 <= woken.started - probed.at <= 0.05  # woken by the probe's end, not max_wait


# --- specs, config errors, attribution in the kernel and the CLI ------------------------


def test_spec_strings_and_files(fakes: FakeServer, tmp_path: Path) -> None:
    url = f"{fakes.url}/specok/v1"
    FAKES["specok"] = Fake()
    pool = resolve(
        f"pool:[openai_http:a@{url}, openai_http:b@{url}]?failures=2&cooldown=0.5"
        "&when_all_cooling=fail"
    )
    assert isinstance(pool, Pool)
    assert [m.name for m in pool] == [f"openai_http:a@{url}", f"openai_http:b@{url}"]
    assert (pool.config.failures, pool.config.cooldown) == (2, 0.5)
    assert pool.config.when_all_cooling == "fail"
    assert pool.members[0].backend.client.max_retries == 0  # the pool owns retries
    spec = tmp_path / "pool.yaml"
    spec.write_text(
        "members:\n"
        f"  - backend: openai_http:a@{url}\n"
        "    price: {completion_per_mtok: 2.0}\n"
        "    context_window: 8192\n"
        "    timeout: 5\n"
        "    policy: {server: fallback}\n"
        f"  - openai_http:b@{url}\n"
        "cooldown: 3\n"
    )
    pool = resolve(f"pool:{spec}")
    assert isinstance(pool, Pool)
    first = pool.members[0]
    assert first.price == {"completion_per_mtok": 2.0} and first.context_window == 8192
    assert first.policy["server"] == "fallback" and first.policy["rate_limit"] == "retry"
    assert pool.config.cooldown == 3 and run(pool.chat(HI)).backend == first.name


@pytest.mark.parametrize(
    ("spec", "field_name"),
    [
        ("pool:[openai_http:a@http://x]?cooldown=soon", "cooldown"),
        ("pool:[openai_http:a@http://x]?colldown=1", "colldown"),
        ("pool:[openai_http:a@http://x]?when_all_cooling=panic", "when_all_cooling"),
        ("pool:[openai_http:a@http://x]?failures=0", "failures"),
        ("pool:[nonsense]", "members[0].backend"),
        ("pool:[]", "members"),
        ("pool:[openai_http:a@http://x, openai_http:a@http://x]", "named twice"),
    ],
)
def test_bad_specs_name_the_field(spec: str, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name.replace("[", r"\[").replace("]", r"\]")):
        resolve(spec)


def test_bad_member_config_names_the_field(tmp_path: Path) -> None:
    for body, what in [
        ("policy: {server: explode}", "policy.server"),
        ("policy: {weird: retry}", "unknown error kind 'weird'"),
        ("price: {per_token: 1}", "price: unknown field 'per_token'"),
        ("timeout: -1", "timeout"),
        ("colour: red", "unknown field"),
    ]:
        spec = tmp_path / "bad.yaml"
        spec.write_text(f"members:\n  - backend: openai_http:a@http://x\n    {body}\n")
        with pytest.raises(ValueError, match=r"members\[0\]") as info:
            resolve(f"pool:{spec}")
        assert what in str(info.value)


def test_kernel_records_and_prices_the_member_that_answered(
    fakes: FakeServer, real: RunningServer, tmp_path: Path
) -> None:
    """A process on a pool whose first member is down: its step names llmos serve, the usage
    row is keyed by it, and the cost is that member's own price."""
    down = fake(fakes, "kdown", "500")
    serve = llmos_serve(real, price={"completion_per_mtok": 1e6, "per_engine_second": 0.0})
    pool = Pool([down, serve], PoolConfig(failures=1, cooldown=30))
    kernel = Kernel(backend=pool, db=str(tmp_path / "k.db"))
    try:
        prog = Program(name="hi", sampling={"max_tokens": 4, "temperature": 0})
        proc = kernel.wait(kernel.spawn(prog, "Say hi."))
        assert proc.status.value == "done", proc.report
        (turn,) = [s for s in proc.steps if s.kind == "model_turn"]
        assert turn.backend == serve.name
        assert turn.cost == pytest.approx(turn.completion_tokens * 1.0)
        with sqlite3.connect(tmp_path / "k.db") as db:
            rows = db.execute("SELECT model, cost FROM usage").fetchall()
        assert rows == [(serve.name, pytest.approx(turn.completion_tokens * 1.0))]
    finally:
        kernel.close()


def test_cli_run_logs_usage_show_the_answering_backend(
    fakes: FakeServer, real: RunningServer, tmp_path: Path
) -> None:
    FAKES["clidown"] = Fake("500")
    down = f"openai_http:x@{fakes.url}/clidown/v1"
    serve = f"openai_http:smollm2-135m@{real.url}/v1"
    prog = tmp_path / "prog.yaml"
    prog.write_text(
        f'name: hi\nmodel: "pool:[{down}, {serve}]?failures=1"\n'
        "sampling: {max_tokens: 4, temperature: 0}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_BACKEND"}
    env.update(LLMOS_DB=str(tmp_path / "k.db"), COLUMNS="250")
    llmos = str(Path(sys.executable).parent / "llmos")

    def cli(*args: str) -> str:
        r = subprocess.run([llmos, *args], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    cli("run", str(prog), "--input", "Say hi.", "--quiet")
    assert len(FAKES["clidown"].calls) == 1
    assert f"via {serve}" in cli("logs", "1")
    usage = cli("usage")
    assert serve in usage and down not in usage
    assert "hi@1" in cli("ps", "--all")


def test_the_meter_prices_the_member_that_answered(tmp_path: Path) -> None:
    """Its own price first; else the price table's for its name, then for its kind."""
    meter = Meter(Store(tmp_path / "m.db"), {"openai_http:b@http://b": Price(prompt_per_mtok=9)})
    a = Member(OpenAIHTTPBackend("http://a", "a"), price={"completion_per_mtok": 3.0})
    b = Member(OpenAIHTTPBackend("http://b", "b"))
    c = Member(OpenAIHTTPBackend("http://c", "c"))
    pool = Pool([a, b, c])
    result = run(ScriptedBackend([{"content": "x"}]).chat(HI))
    assert meter.price_for(pool, replace(result, backend=a.name)) == Price(completion_per_mtok=3)
    assert meter.price_for(pool, replace(result, backend=b.name)) == Price(prompt_per_mtok=9)
    assert meter.price_for(pool, replace(result, backend=c.name)) == DEFAULT_PRICES["openai_http"]
    # a composite without members to look up (a cascade): by the answering name's kind
    local = replace(result, backend="local:smollm2-135m")
    assert meter.price_for(ScriptedBackend([]), local) == DEFAULT_PRICES["local"]
    assert meter.price_for(pool, result) == Price()  # unattributed: the pool's own kind
