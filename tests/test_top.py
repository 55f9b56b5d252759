"""`llmos top` in a real terminal (tmux: new-session, send-keys, capture-pane), on a real kernel
DB and a real server's /metrics: a process waiting for approval holds pinned KV blocks on the
real model, and top shows them, sorts, filters by user, opens the log and kills it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from llmos import LLM
from llmos.backends.local import LocalBackend
from llmos.backends.scripted import ScriptedBackend
from llmos.engine.async_engine import AsyncEngine
from llmos.kernel import Kernel, Program, Status
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
LLMOS = str(Path(sys.executable).with_name("llmos"))
WAITER = Program(
    name="waiter",
    system_prompt="You write notes to files.",
    tools=["write_file"],
    tool_choice="required",
    policy={"needs_approval": ["write_file"]},
    sampling={"temperature": 0, "max_tokens": 48},
)


@pytest.fixture(scope="module")
def engine(llm: LLM) -> AsyncEngine:
    return AsyncEngine(llm.engine)


@pytest.fixture(scope="module")
def server(engine: AsyncEngine) -> Iterator[RunningServer]:
    with serve_in_thread(create_app(engine)) as running:
        with OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0) as client:
            client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=4)
        yield running


@pytest.fixture(scope="module")
def kernel(
    tmp_path_factory: pytest.TempPathFactory, engine: AsyncEngine
) -> Iterator[tuple[Kernel, int]]:
    """Two finished processes (ann, bob) and carl's, waiting for approval on the real model."""
    db = tmp_path_factory.mktemp("top") / "k.db"
    ws = db.parent / "ws"
    ws.mkdir()
    with Kernel(db=db) as k:
        k.backend = ScriptedBackend([{"content": "done"}])
        for user in ("ann", "bob"):
            assert k.wait(k.spawn(Program(name="greeter"), f"hi {user}", user=user), 30).answer
        k.backend = LocalBackend(engine)
        pid = k.spawn(WAITER, "Write 'milk' to list.txt.", user="carl", workspace=ws)
        deadline = time.monotonic() + 120
        while k.get(pid).status is not Status.WAITING_APPROVAL:
            assert time.monotonic() < deadline and not k.get(pid).status.finished
            time.sleep(0.2)
        yield k, pid
        if not k.get(pid).status.finished:
            k.kill(pid)
        k.wait(pid, 30)


class Terminal:
    def __init__(self, name: str, command: str) -> None:
        self.tmux = ["tmux", "-L", name]
        subprocess.run(
            [*self.tmux, "new-session", "-d", "-s", "top", "-x", "150", "-y", "40", command],
            check=True,
        )

    def screen(self) -> str:
        return subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True
        ).stdout

    def keys(self, *keys: str) -> None:
        for key in keys:
            subprocess.run([*self.tmux, "send-keys", "-t", "top", key], check=True)
            time.sleep(0.15)

    def wait_for(self, check: Callable[[str], bool], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            assert time.monotonic() < deadline, f"not on screen in {timeout}s:\n{screen}"
            time.sleep(0.2)

    def alive(self) -> bool:
        return subprocess.run([*self.tmux, "has-session", "-t", "top"]).returncode == 0

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


ROW = re.compile(r"\s*▸?\s*(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+\$([\d.]+)\s+(\S+)")


def row(screen: str, pid: int) -> str:
    return next((ln for ln in screen.splitlines() if re.match(rf"\s*▸?\s*{pid}\s", ln)), "")


def cells(line: str) -> tuple[str, ...]:
    """pid, program, user, state, steps, tokens, cost, kv"""
    m = ROW.match(line)
    assert m, line
    return m.groups()


def test_top_in_a_real_terminal(
    server: RunningServer, kernel: tuple[Kernel, int], engine: AsyncEngine, tmp_path: Path
) -> None:
    k, carl = kernel
    command = f"env -u COLUMNS -u LINES {LLMOS} top --db {k.store.path} --url {server.url}"
    term = Terminal(f"llmos-top-{tmp_path.name}", command)
    try:
        screen = term.wait_for(lambda s: "carl" in s and "TTFT" in s, timeout=60)
        assert "waiting_approval" in row(screen, carl)
        assert re.search(r"TTFT \d+ ms", screen) and re.search(r"KV use \d+\.\d%", screen)
        assert re.search(r"running 0\s", screen) and re.search(r"waiting 0\s", screen)
        assert re.search(r"prefix-cache hits \d+\.\d%", screen)
        kv = cells(row(screen, carl))[7]
        # its first turn's KV blocks, pinned while it waits
        assert kv.isdigit() and int(kv) > 0, row(screen, carl)
        assert "ann" in screen and "bob" in screen

        term.keys("u")  # the first user only
        screen = term.wait_for(lambda s: "user ann" in s)
        assert "ann" in screen and "bob" not in screen and "carl" not in screen
        term.keys("u", "u")
        screen = term.wait_for(lambda s: "user carl" in s and "waiter" in s)
        assert "▸" in row(screen, carl) and "greeter" not in screen

        term.keys("l")  # the selected process's log
        screen = term.wait_for(lambda s: f"log pid {carl}" in s)
        assert "Write 'milk' to list.txt." in screen and "write_file" in screen
        term.keys("Escape")
        term.wait_for(lambda s: "PID" in s and f"log pid {carl}" not in s)

        term.keys("u")  # all users again, then sort by state
        term.keys("s")
        screen = term.wait_for(lambda s: "user all" in s and "sort state" in s and "STATE▲" in s)
        states = [cells(ln)[3] for ln in screen.splitlines() if ROW.match(ln)]
        assert len(states) == 3
        assert states == sorted(states)
        term.keys("r")
        term.wait_for(lambda s: "STATE▼" in s)

        term.keys("u", "u", "u", "x")  # carl's only, and kill it
        term.wait_for(lambda s: f"kill requested: pid {carl}" in s)
        assert k.wait(carl, 30).status is Status.KILLED
        deadline = time.monotonic() + 30  # its pinned blocks go back to the engine
        while engine.stats().kv_blocks_pinned:
            assert time.monotonic() < deadline, "the killed process kept its KV blocks"
            time.sleep(0.1)
        term.wait_for(lambda s: "killed" in row(s, carl), timeout=10)

        term.keys("q")
        deadline = time.monotonic() + 10
        while term.alive():
            assert time.monotonic() < deadline, "q did not quit"
            time.sleep(0.1)
    finally:
        term.close()


def test_keys_arriving_together_are_each_read() -> None:
    from llmos.cli.top import split_keys

    assert split_keys("us\x1b[A\x1b[B\x1b\r\x1b[5~x") == [
        "u",
        "s",
        "up",
        "down",
        "\x1b",
        "enter",
        "x",
    ]
