"""`llmos serve` as a user runs it: a process that prints how to call it and stops on SIGTERM."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

BOOT_TIMEOUT = 180.0


@pytest.fixture
def serve_process() -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """`llmos serve --port 0`, with the URL and banner it printed."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from llmos.cli.main import app; app()",
            "serve",
            "--port",
            "0",
            "--kv-cache-memory",
            "64MiB",
            "--max-num-seqs",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
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
            if line is None:
                raise AssertionError(f"llmos serve exited: {proc.stderr.read()}")  # type: ignore[union-attr]
            banner += line
        url = re.search(r"http://127\.0\.0\.1:\d+", banner).group(0)  # type: ignore[union-attr]
        yield proc, url, banner
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_banner_shows_ready_examples(serve_process: tuple[subprocess.Popen[str], str, str]) -> None:
    _, url, banner = serve_process
    assert f"curl {url}/v1/chat/completions" in banner
    assert f'OpenAI(base_url="{url}/v1"' in banner
    body = re.search(r"-d '(.*)'", banner).group(1)  # type: ignore[union-attr]
    r = httpx.post(
        f"{url}/v1/chat/completions", json={**json.loads(body), "max_tokens": 2}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(
    serve_process: tuple[subprocess.Popen[str], str, str],
) -> None:
    proc, url, _ = serve_process
    events: queue.Queue[str] = queue.Queue()

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            timeout=120,
            json={
                "prompt": "Once upon a time",
                "max_tokens": 16,
                "stream": True,
                "ignore_eos": True,
            },
        ) as r:
            for line in r.iter_lines():
                if line:
                    events.put(line)

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    first = events.get(timeout=120)
    assert first.startswith("data: {")
    proc.send_signal(signal.SIGTERM)
    reader.join(120)
    got = [first] + [events.get_nowait() for _ in range(events.qsize())]
    assert got[-1] == "data: [DONE]"
    assert json.loads(got[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(60) == 0
