"""`AsyncEngine`: one engine thread, many asyncio callers, each streaming its own outputs.

The engine is not thread-safe, so every change to it (add, abort) is a command that the engine
thread applies between steps. A caller that stops listening (a dropped HTTP stream) aborts its
request, which frees its KV blocks before the next step.

Give it a factory (`AsyncEngine(lambda: LLMEngine(...))`) rather than a built engine where you
can: the engine is then built on its own thread, so that thread owns the only OpenMP thread
pool. A second pool (the one the loading thread made) oversubscribes two cores, and OpenMP then
parks its workers between parallel regions: each step ran 2-3x slower on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import RequestOutput

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._go = threading.Event()
        self._thread: threading.Thread | None = None
        self.step_listeners: list[Callable[[list[RequestOutput]], None]] = []
        if isinstance(engine, LLMEngine):
            self.engine = engine
            return
        # Build on the engine thread (which then waits for start()); errors reach the caller.
        built: Future[LLMEngine] = Future()
        threads = torch.get_num_threads()  # OpenMP's thread count is per thread: carry it over

        def build() -> None:
            torch.set_num_threads(threads)
            try:
                built.set_result(engine())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                built.set_exception(exc)
                return
            self._go.wait()
            if not self._stop.is_set():
                self._run()

        self._thread = threading.Thread(target=build, name="llmos-engine", daemon=True)
        self._thread.start()
        try:
            self.engine = built.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise

    @property
    def tokenizer(self):  # noqa: ANN201 - the engine's Tokenizer
        return self.engine.tokenizer

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
            self._thread.start()
        self._go.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is in flight and stop the engine thread."""
        for rid in list(self._streams):
            self.abort(rid)
        self._stop.set()
        self._wake.set()
        self._go.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- requests -------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | Seq[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        priority: int = 0,
        user: str | None = None,
        retain: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield snapshots of the request's outputs as tokens are made; the last is finished.

        Bad input raises (RequestError) before anything is yielded."""
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        rid = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        added: Future[list[int]] = Future()

        def add() -> None:
            try:
                self.engine.add_request(
                    rid, prompt, params, priority=priority, user=user, retain=retain
                )
                self._streams[rid] = stream
                added.set_result([])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                added.set_exception(exc)

        self._submit(add)
        await asyncio.wrap_future(added)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        def do() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        self._submit(do)

    def release(self, key: str) -> None:
        """Unpin the KV blocks kept under `key` (see `LLMEngine.add_request(retain=...)`)."""
        self._submit(lambda: self.engine.release(key))

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future[Any]:
        """Run `fn(engine)` on the engine thread, between steps."""
        fut: Future[Any] = Future()

        def do() -> None:
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)

        self._submit(do)
        return fut

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception:  # a failed command must not kill the engine thread
                log.exception("engine command failed")

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._drain()
            if not engine.has_unfinished_requests():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # the engine aborted the failed requests; tell their callers
                for rid in [r for r in self._streams if r not in engine.requests]:
                    self._streams.pop(rid).put(exc)
                continue
            # One wake-up per event loop per step, not one per stream: at 64 streams the
            # loop's self-pipe writes and wake-ups were a visible share of a step.
            batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    if out.finished:
                        del self._streams[out.request_id]
                    batches.setdefault(stream.loop, []).append((stream, out))
            for loop, items in batches.items():
                loop.call_soon_threadsafe(_deliver, items)
            for listener in self.step_listeners:
                listener(outputs)
        self._drain()
        dead = EngineDeadError("the engine stopped")
        for rid, stream in list(self._streams.items()):
            engine.abort_request(rid)
            stream.put(dead)
        self._streams.clear()
