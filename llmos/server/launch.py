"""Run the app under uvicorn: in the foreground (`llmos serve`) or on a thread (tests, notebooks).

On SIGTERM or SIGINT the server drains, and stops within about `grace` seconds: the requests in
flight get all but the last few seconds of it to finish, while the socket stays open and every
new request is answered 503 (OpenAI's shape), so clients and load balancers read why. Past that
each request still running ends with a 503
(in a stream: an error event, then [DONE]) and is aborted in the engine; then the socket
closes and the lifespan stops the engine. A second signal stops at once: the requests in flight
get their error, and the process exits without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import uvicorn
from fastapi import FastAPI

from llmos.server.app import server_state

log = logging.getLogger(__name__)
_FLUSH = 1.0  # seconds for interrupted requests to send their error before connections close
# of the grace period, kept for stopping (errors out, the engine stopped, the process ended)
_STOP_RESERVE = 2.5


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace: float) -> None:
        super().__init__(config)
        self.grace = grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = server_state(self.config.app)
        if state.draining:  # a second signal: stop now (uvicorn alone forces only on SIGINT)
            self.force_exit = True
        state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = server_state(self.config.app)
        state.draining = True
        deadline = time.monotonic() + max(self.grace - _STOP_RESERVE, self.grace / 2)
        # The socket stays open meanwhile: the Guard answers new requests 503.
        while len(state.in_flight) and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if len(state.in_flight):
            log.warning(
                "stopping %d request(s) still in flight after %s",
                len(state.in_flight),
                "a second signal" if self.force_exit else f"the {self.grace:g} s grace period",
            )
        state.in_flight.stop()
        flush = time.monotonic() + _FLUSH
        while self.server_state.tasks and time.monotonic() < flush:
            await asyncio.sleep(0.02)
        self.config.timeout_graceful_shutdown = 1  # what is left now is cancelled
        await super().shutdown(sockets)


def make_server(app: FastAPI, *, grace: float = 30.0, verbose: bool = False) -> Server:
    config = uvicorn.Config(
        app,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        lifespan="on",
    )
    return Server(config, grace)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket; port 0 picks a free one (read it back with getsockname).

    Its protocol is named (IPPROTO_TCP), as asyncio sets TCP_NODELAY on accepted connections
    only then; without it each small SSE write waits on Nagle's algorithm and delayed ACKs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        # listening at once: a client that connects as soon as the banner shows the URL waits
        # in the backlog while the app starts, instead of being refused
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(slots=True)
class RunningServer:
    url: str  # e.g. http://127.0.0.1:41234 (the API is under /v1)
    server: Server
    thread: threading.Thread

    def drain(self) -> None:
        """What SIGTERM does: refuse new requests, let the ones in flight finish, stop."""
        self.server.handle_exit(15, None)

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@contextmanager
def serve_in_thread(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    grace: float = 30.0,
    start_timeout: float = 60.0,
) -> Iterator[RunningServer]:
    """Serve `app` on a background thread until the block ends."""
    sock = bind(host, port)
    server = make_server(app, grace=grace)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="llmos-uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    running = RunningServer(url_of(sock), server, thread)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(start_timeout)
        sock.close()
