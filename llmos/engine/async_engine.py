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
import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

import torch

from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import RequestOutput
from llmos.engine.stats import EngineStats
from llmos.errors import EngineDeadError, StepFailed

__all__ = ["AsyncEngine", "EngineDeadError"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: it is gone
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
        self._dead = False  # set once by the engine thread as it exits; then nothing is queued
        self._submit_lock = threading.Lock()
        if isinstance(engine, LLMEngine):
            self.engine = engine
            self._stats = engine.stats()
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
            self._dead = True

        self._thread = threading.Thread(target=build, name="llmos-engine", daemon=True)
        self._thread.start()
        try:
            self.engine = built.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        self._stats = self.engine.stats()  # (the engine thread waits for start(): no race)

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

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step. Safe from any thread: the snapshot is
        made on the engine thread and never changes (live engine state is not read here)."""
        return self._stats

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
            # the caller may have been cancelled while it waited (its abort is queued next)
            with contextlib.suppress(InvalidStateError):
                try:
                    self.engine.add_request(
                        rid, prompt, params, priority=priority, user=user, retain=retain
                    )
                    self._streams[rid] = stream
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    added.set_exception(exc)
                else:
                    added.set_result([])

        self._submit(add)
        finished = False
        try:
            await asyncio.wrap_future(added)  # (a caller cancelled here still aborts the request)
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

        with contextlib.suppress(EngineDeadError):  # a dead engine aborted everything
            self._submit(do)

    def release(self, key: str) -> None:
        """Unpin the KV blocks kept under `key` (see `LLMEngine.add_request(retain=...)`)."""
        with contextlib.suppress(EngineDeadError):
            self._submit(lambda: self.engine.release(key))

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future[Any]:
        """Run `fn(engine)` on the engine thread, between steps."""
        fut: Future[Any] = Future()

        def do() -> None:
            with contextlib.suppress(InvalidStateError):  # the caller stopped waiting
                try:
                    value = fn(self.engine)
                except BaseException as exc:  # noqa: BLE001
                    fut.set_exception(exc)
                else:
                    fut.set_result(value)

        try:
            self._submit(do)
        except EngineDeadError as exc:
            fut.set_exception(exc)
        return fut

    def _submit(self, command: Callable[[], None]) -> None:
        with self._submit_lock:  # a command queued after the thread's last drain would be lost
            if self._dead:
                raise EngineDeadError("the engine is not running")
            self._commands.put(command)
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------
    def _drain(self) -> bool:
        """Apply the queued commands; True if there were any."""
        ran = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            try:
                command()
            except Exception:  # a failed command must not kill the engine thread
                log.exception("engine command failed")

    def _run(self) -> None:
        """Step while there is work. Whatever fails here fails the requests it touched with a
        clear error; if the loop itself dies, every caller gets EngineDeadError: no caller
        waits forever."""
        engine = self.engine
        try:
            while not self._stop.is_set():
                if self._drain():  # adds and aborts show before the next (maybe long) step
                    self._stats = engine.stats()
                if not engine.has_unfinished_requests():
                    self._stats = engine.stats()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._step(engine)
        except BaseException:
            log.exception("the engine thread failed")
            raise
        finally:
            with self._submit_lock:
                self._dead = True
            self._drain()
            self._fail(list(self._streams), EngineDeadError("the engine stopped"))

    def _step(self, engine: LLMEngine) -> None:
        touched: list[str] = []
        try:
            outputs = engine.step()
            # One wake-up per event loop per step, not one per stream: at 64 streams the
            # loop's self-pipe writes and wake-ups were a visible share of a step.
            batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
            for out in outputs:
                touched.append(out.request_id)
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    if out.finished:
                        del self._streams[out.request_id]
                    batches.setdefault(stream.loop, []).append((stream, out))
            for loop, items in batches.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that loop is closed: its callers are gone
                    for _stream, out in items:
                        self._fail([out.request_id], EngineDeadError("the caller's loop closed"))
            self._stats = engine.stats()
        except StepFailed as exc:  # the engine aborted the step's requests
            self._fail(exc.request_ids, exc)
        except Exception as exc:  # not the step's own failure: fail what it touched, or all
            log.exception("engine step failed outside the model")
            failed = touched or list(self._streams)
            self._fail(failed, StepFailed(failed, exc))

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        """Abort these requests (their blocks go back) and hand `exc` to their callers."""
        for rid in request_ids:
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - the callers must still hear of it
                log.exception("abort of %s failed", rid)
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(exc)
