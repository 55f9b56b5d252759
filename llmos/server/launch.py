"""Run the app under uvicorn: in the foreground (`llmos serve`) or on a thread (tests, notebooks).

On SIGTERM or SIGINT the app refuses new requests at once (503, and the listening socket
closes), the requests in flight get `grace` seconds to finish, the rest are cancelled (which
aborts them in the engine), and then the lifespan stops the engine.
"""

from __future__ import annotations

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


class Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        server_state(self.config.app).draining = True
        super().handle_exit(sig, frame)


def make_server(app: FastAPI, *, grace: float = 30.0, verbose: bool = False) -> Server:
    config = uvicorn.Config(
        app,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(grace)),
    )
    return Server(config)


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
