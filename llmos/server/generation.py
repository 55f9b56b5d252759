"""The engine requests behind one HTTP request: admitted, started, primed, merged, closed.

`Generation.start` returns only once the engine accepted every prompt (each produced its first
output), so a bad prompt is refused with a status code before any response byte is sent. Closing
a generation closes its engine streams, which aborts what is unfinished and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

from llmos.engine.async_engine import EngineDeadError
from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import RequestOutput
from llmos.errors import RequestError
from llmos.server import guards
from llmos.server.drain import InFlight
from llmos.server.errors import APIError, ClientDisconnected
from llmos.server.limits import Ticket
from llmos.server.metrics import RequestTracker
from llmos.server.state import ServerState

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class PromptJob:
    prompt: str | list[int]
    params: SamplingParams


def as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError.from_request_error(exc)
    if isinstance(exc, EngineDeadError):
        return APIError(503, "the engine is not running", code="engine_unavailable")
    log.error("request failed in the engine: %r", exc)
    return APIError.internal(exc)


class Generation:
    def __init__(
        self,
        streams: list[AsyncIterator[RequestOutput]],
        trackers: list[RequestTracker],
        ticket: Ticket,
        in_flight: InFlight,
    ) -> None:
        self._streams = streams
        self._trackers = trackers
        self._ticket = ticket
        self._in_flight = in_flight
        self._firsts: list[RequestOutput] = []
        self._pumps: list[asyncio.Task[None]] = []
        # every output and failure, from one pump task per engine stream; (-1, error) interrupts
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = (
            asyncio.Queue()
        )
        self._starting: asyncio.Future[list[RequestOutput | BaseException]] | None = None
        self._interrupted: APIError | None = None

    @classmethod
    async def start(
        cls,
        state: ServerState,
        request: Request,
        jobs: Sequence[PromptJob],
        *,
        request_id: str,
        priority: int = 0,
        user: str | None = None,
    ) -> Generation:
        """Admit the jobs and wait for each one's first output (or the first refusal)."""
        guarded = await guards.prepare(state.config.guards, request, [j.params for j in jobs])
        jobs = [PromptJob(j.prompt, p) for j, p in zip(jobs, guarded, strict=True)]
        ticket = state.admission.enter(sum(job.params.n for job in jobs))
        streams = [
            state.engine.generate(
                job.prompt,
                job.params,
                priority=priority,
                user=user,
                request_id=request_id if len(jobs) == 1 else f"{request_id}-{i}",
            )
            for i, job in enumerate(jobs)
        ]
        self = cls(streams, [state.metrics.track() for _ in jobs], ticket, state.in_flight)
        self._starting = asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        state.in_flight.add(self)
        try:
            firsts = await unless_disconnected(request.receive, self._starting)
        except BaseException:
            await self.close()
            if self._interrupted is not None:
                raise self._interrupted from None
            raise
        failure = next((r for r in firsts if isinstance(r, BaseException)), None)
        if failure is not None:
            await self.close()
            if isinstance(failure, asyncio.CancelledError):
                raise failure
            raise as_api_error(failure)
        self._firsts = firsts
        for tracker, out in zip(self._trackers, self._firsts, strict=True):
            tracker.observe(out)
        return self

    def interrupt(self, error: APIError) -> None:
        """End this generation with `error` (what its reader raises) at its next output."""
        self._interrupted = error
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        self._queue.put_nowait((-1, error))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative snapshot), in arrival order; engine failures raise."""
        if self._interrupted is not None:
            raise self._interrupted
        for i, out in enumerate(self._firsts):
            yield i, out
        queue = self._queue

        async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
            except Exception as exc:  # noqa: BLE001 - handed to the reader
                queue.put_nowait((i, exc))
            queue.put_nowait((i, None))

        self._pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        open_streams = len(self._streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                self._trackers[i].observe(item)
                yield i, item

    async def final(self) -> list[RequestOutput]:
        """The finished output of every prompt, in prompt order."""
        last: list[RequestOutput] = list(self._firsts)
        async for i, out in self.outputs():
            last[i] = out
        return last

    async def close(self) -> None:
        """Abort what is unfinished, count tokens, give back the admission ticket.

        The bookkeeping comes first and without awaiting, as this runs in cancelled tasks too."""
        self._in_flight.discard(self)
        self._ticket.release()
        for tracker in self._trackers:
            tracker.close()
        if self._pumps:  # each pump owns its stream: cancelling it closes the stream
            for task in self._pumps:
                task.cancel()
            return
        for stream in self._streams:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]


async def collect(request: Request, gen: Generation) -> list[RequestOutput]:
    """Every prompt's finished output; ClientDisconnected (answered 499) if the client left."""
    try:
        return await unless_disconnected(request.receive, gen.final())
    except (ClientDisconnected, APIError):
        raise
    except Exception as exc:
        raise as_api_error(exc) from exc
    finally:
        await gen.close()


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            task.add_done_callback(_retrieve)  # nobody awaits it now; keep asyncio quiet
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
