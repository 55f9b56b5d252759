"""SIGTERM under load, on a real `llmos serve` process: streams in flight finish or end with an
error event the client reads, new requests get a 503 in OpenAI's shape, the process exits
within its grace period, and a second SIGTERM exits at once."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from openai import OpenAI

BOOT_TIMEOUT = 180.0


@contextmanager
def llmos_serve(*flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from llmos.cli.main import app; app()",
            "serve",
            "--port",
            "0",
            "--kv-cache-memory",
            "128MiB",
            "--max-num-seqs",
            "8",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    banner = ""
    try:
        while "Ctrl+C" not in banner:
            line = lines.get(timeout=BOOT_TIMEOUT)
            assert line is not None, "llmos serve exited before it was ready"
            banner += line
        yield proc, re.search(r"http://127\.0\.0\.1:\d+", banner).group(0)  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@dataclass
class Stream:
    """One streaming /v1/completions request read on its own thread."""

    url: str
    max_tokens: int
    events: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        body = {
            "prompt": "Once upon a time",
            "max_tokens": self.max_tokens,
            "stream": True,
            "ignore_eos": True,
        }
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        self.events.append(line)
                        self.started.set()
        except httpx.HTTPError as exc:
            self.failure = exc
        finally:
            self.started.set()
            self.done.set()

    def payloads(self) -> list[dict]:
        return [json.loads(e[len("data: ") :]) for e in self.events if e != "data: [DONE]"]


def assert_refused_with_503(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=10)
    assert r.status_code == 503, r.text
    assert r.json() == {
        "error": {
            "message": "the server is shutting down",
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    }
    assert httpx.get(f"{url}/health", timeout=10).status_code == 503


def test_sigterm_under_load_drains_then_stops_what_is_left() -> None:
    grace = 5.0
    with llmos_serve("--grace", str(grace)) as (proc, url):
        short = [Stream(url, 8) for _ in range(3)]
        long = [Stream(url, 1000) for _ in range(3)]
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        official = client.completions.create(
            model="smollm2-135m",
            prompt="Once upon a time",
            max_tokens=1000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(official)
        next(chunks)
        for s in short + long:
            assert s.started.wait(120) and s.events, s.failure
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert_refused_with_503(url)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in chunks:
                pass
        code = proc.wait(grace + 10)
        elapsed = time.monotonic() - sent
        print(f"\nSIGTERM with 7 streams in flight, grace {grace:g} s: exited in {elapsed:.2f} s")
        assert code == 0
        assert grace / 2 < elapsed < grace + 0.5
        for s in short:  # finished inside the grace period
            assert s.done.wait(5) and s.failure is None
            assert s.events[-1] == "data: [DONE]"
            assert s.payloads()[-1]["choices"][0]["finish_reason"] == "length"
        for s in long:  # outlived it: a clear error event, then [DONE]
            assert s.done.wait(5) and s.failure is None
            assert s.events[-1] == "data: [DONE]"
            error = s.payloads()[-1]["error"]
            assert error["code"] == "shutting_down" and error["type"] == "server_error"
            assert len(s.payloads()) > 3  # they kept streaming during the grace period


def test_a_second_sigterm_stops_at_once() -> None:
    with llmos_serve("--grace", "60", "--strict-fields") as (proc, url):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "gaurds": []}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "gaurds"  # --strict-fields
        streams = [Stream(url, 1000) for _ in range(4)]
        for s in streams:
            assert s.started.wait(120) and s.events, s.failure
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert_refused_with_503(url)
        assert proc.poll() is None  # draining: the streams go on
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        elapsed = time.monotonic() - sent
        print(f"\nsecond SIGTERM with 4 streams in flight: exited in {elapsed:.2f} s")
        assert code == 0 and elapsed < 3
        for s in streams:
            assert s.done.wait(5) and s.failure is None
            assert s.events[-1] == "data: [DONE]"
            assert s.payloads()[-1]["error"]["code"] == "shutting_down"
