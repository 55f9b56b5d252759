"""Faults on the engine thread: whatever fails there fails the requests it touched, with a
clear error, and nothing waits forever. Engine state is read off that thread only through the
published snapshot. (Issue 12, defects 1 and 2.)"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator

import pytest

from llmos.backends.base import ChatRequest
from llmos.backends.local import LocalBackend
from llmos.engine.async_engine import AsyncEngine, EngineDeadError
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.engine.stats import EngineStats
from llmos.errors import StepFailed
from llmos.server.state import ServerConfig, ServerState

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
TIMEOUT = 60  # seconds: far more than any of these requests needs; reaching it is a hang


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    ae = AsyncEngine(lambda: LLMEngine(kv_cache_memory="64MiB", max_num_seqs=8))
    ae.start()
    yield ae
    ae.shutdown()


async def _collect(ae: AsyncEngine, prompt: str, rid: str, params: SamplingParams = PARAMS):
    final = None
    async for out in ae.generate(prompt, params, request_id=rid):
        final = out
    return final


def _no_blocks_held(ae: AsyncEngine) -> None:
    stats = ae.call(lambda e: (e.has_unfinished_requests(), e.blocks.num_used)).result(TIMEOUT)
    assert stats == (False, 0), f"after the fault: (unfinished, blocks used) = {stats}"


def test_a_failing_output_step_fails_its_requests_and_the_engine_lives_on(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in output processing (here: the stop check raising for one request) used to leave
    the request in the engine and its caller waiting forever."""
    llm = engine.engine
    real = llm.output._check_stop

    def check_stop(seq, token):  # noqa: ANN001, ANN202
        if seq.request_id == "doomed" and seq.num_output_tokens == 3:
            raise KeyError("injected")
        return real(seq, token)

    monkeypatch.setattr(llm.output, "_check_stop", check_stop)

    async def main() -> tuple[BaseException | object, object]:
        return await asyncio.wait_for(
            asyncio.gather(
                _collect(engine, "Tell me a story.", "doomed"),
                _collect(engine, "Count to ten.", "bystander-before"),
                return_exceptions=True,
            ),
            TIMEOUT,
        )

    doomed, _ = asyncio.run(main())
    assert isinstance(doomed, StepFailed), doomed
    assert "KeyError" in str(doomed) and "doomed" in doomed.request_ids
    monkeypatch.setattr(llm.output, "_check_stop", real)
    after = asyncio.run(asyncio.wait_for(_collect(engine, "Count to ten.", "after"), TIMEOUT))
    assert after.finished and len(after.outputs[0].token_ids) == PARAMS.max_tokens
    _no_blocks_held(engine)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_loop_fails_every_caller_and_refuses_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ae = AsyncEngine(lambda: LLMEngine(kv_cache_memory="32MiB", max_num_seqs=4))
    ae.start()
    llm = ae.engine
    real_step = llm.step
    calls = 0

    def step():  # noqa: ANN202 - dies (not an Exception: the loop itself) on the 3rd step
        nonlocal calls
        calls += 1
        if calls == 3:
            raise SystemExit("injected: the engine loop dies")
        return real_step()

    monkeypatch.setattr(llm, "step", step)

    async def main() -> list[object]:
        return await asyncio.wait_for(
            asyncio.gather(
                *(_collect(ae, "Hello there", f"r{i}") for i in range(3)), return_exceptions=True
            ),
            TIMEOUT,
        )

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) for r in results), results
    ae._thread.join(TIMEOUT)  # type: ignore[union-attr]
    assert not ae.alive

    async def again() -> None:
        await _collect(ae, "Hello", "late")

    with pytest.raises(EngineDeadError):
        asyncio.run(asyncio.wait_for(again(), TIMEOUT))
    assert ae.call(lambda e: 1).exception(TIMEOUT) is not None  # refused, not queued forever
    ae.shutdown()


def test_local_backend_engine_seconds_ride_on_the_output(engine: AsyncEngine) -> None:
    """Per-request engine time comes from the request's own output (it used to be a dict the
    kernel thread popped while the engine thread added to it: a KeyError on the engine)."""
    backend = LocalBackend(engine)

    async def main() -> list[object]:
        reqs = [
            ChatRequest(
                [{"role": "user", "content": f"Say {i}."}],
                sampling={"max_tokens": 8 + 4 * i, "ignore_eos": True},
            )
            for i in range(6)
        ]
        return await asyncio.wait_for(asyncio.gather(*(backend.chat(r) for r in reqs)), TIMEOUT)

    results = asyncio.run(main())
    assert all(r.engine_seconds > 0 for r in results), [r.engine_seconds for r in results]
    assert engine.alive
    asyncio.run(backend.aclose())  # (does not own the engine: it keeps running)
    assert engine.alive


def test_other_threads_read_only_the_published_snapshot(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics and admission run on the HTTP thread; they must not read live engine state."""
    callers: set[str] = set()
    real = LLMEngine.stats

    def stats(self: LLMEngine) -> EngineStats:
        callers.add(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(LLMEngine, "stats", stats)
    state = ServerState(engine, ServerConfig(max_waiting=100))
    out = asyncio.run(asyncio.wait_for(_collect(engine, "Hi", "snap"), TIMEOUT))
    assert out.finished
    text = state.metrics.render().decode()  # a scrape, on this (not the engine's) thread
    with state.admission.enter(1):
        pass
    snapshot = engine.stats()
    assert callers == {"llmos-engine"}, callers
    assert "llmos_kv_blocks_total" in text and snapshot.kv_blocks_total > 0
    assert snapshot.num_steps > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.num_steps = 0  # type: ignore[misc]


def test_orphaned_blocks_are_counted_and_zero_in_normal_work() -> None:
    """`kv_blocks_orphaned` (and /metrics' llmos_kv_blocks_orphaned) is what a soak watches:
    blocks in use that no live request or pin holds."""
    llm = LLMEngine(kv_cache_memory="16MiB", max_num_seqs=4)
    for i in range(3):
        llm.add_request(f"r{i}", f"Tell me about the number {i}.", PARAMS, retain=f"k{i % 2}")
    seen = []
    while llm.has_unfinished_requests():
        llm.step()
        seen.append(llm.stats().kv_blocks_orphaned)
    llm.abort_request("none")
    assert set(seen) == {0}
    stats = llm.stats()
    assert stats.kv_blocks_used == stats.kv_blocks_pinned > 0  # only the pins hold blocks now
    llm.blocks._free.pop()  # a leak: a block off the free list that nothing holds
    assert llm.stats().kv_blocks_orphaned == 1


def test_a_caller_cancelled_while_its_add_waits_leaves_no_error_and_no_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The add command still runs after its caller stopped waiting (here: a time limit while a
    slow command held the engine thread); settling its cancelled future used to raise
    InvalidStateError on the engine thread. Its queued abort gives the blocks back."""
    ae = AsyncEngine(lambda: LLMEngine(kv_cache_memory="64MiB", max_num_seqs=4))
    ae.start()
    try:
        gate = threading.Event()
        busy = ae.call(lambda _: gate.wait(TIMEOUT))  # holds the engine thread between steps

        async def impatient() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_collect(ae, "Hello there", "late"), 0.2)

        asyncio.run(impatient())
        waited = ae.call(lambda _: "answered")  # queued after the add and its abort
        gate.set()
        busy.result(TIMEOUT)
        assert waited.result(TIMEOUT) == "answered"
        _no_blocks_held(ae)
        out = asyncio.run(_collect(ae, "Hello there", "after"))
        assert out is not None and out.finished
    finally:
        ae.shutdown()
    failures = [r for r in caplog.records if r.levelname == "ERROR"]
    assert not failures, [r.getMessage() + str(r.exc_info) for r in failures]
