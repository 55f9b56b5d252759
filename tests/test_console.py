"""The web console in a real browser: Debian's headless `chromium` driven by Playwright, on a
real `llmos serve` app (engine, kernel, the embedded model) on a loopback port.

The page must log no console error and fetch nothing but its own server (no CDN: it works
offline). A chat message streams; a spawned process appears and reaches `done`; an approval
clicked in the page unblocks a waiting process; the engine charts receive samples. Screenshots
go to the test's tmp_path.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from test_server_processes import approver, quick  # the same two programs

from llmos import LLM
from llmos.cli.console_evals import EvalHistoryReports
from llmos.engine.async_engine import AsyncEngine
from llmos.evals.history import History
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.processes_host import ProcessHost
from llmos.server.state import ServerConfig
from llmos.server.users import Users, parse_keys

CHROMIUM = "/usr/bin/chromium"
EVAL_RESULT = Path(__file__).parent / "fixtures" / "eval_result.json"
TIMEOUT_MS = 120_000
ALICE, ADMIN = "sk-console-alice", "sk-console-admin"
KEYS = {
    ALICE: "alice",
    ADMIN: {"user": "ops", "admin": True},
}  # the model shares two loaded cores with other tests


@pytest.fixture(scope="module")
def server(llm: LLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = AsyncEngine(llm.engine)
    db = tmp_path_factory.mktemp("kernel") / "kernel.db"
    history = History(db)  # one eval run in the history, as `llmos eval` leaves it
    history.save(json.loads(EVAL_RESULT.read_text()))
    history.close()
    host = ProcessHost.on_engine(
        engine,
        db,
        workspace_root=tmp_path_factory.mktemp("workspaces"),
        users=Users(parse_keys(KEYS)),
        programs={"quick": quick, "approver": approver},
    )
    app = create_app(engine, ServerConfig(), host)
    app.state.eval_reports = EvalHistoryReports(db)  # as `llmos serve` sets it
    with serve_in_thread(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@dataclass
class Console:
    page: Page
    shots: Path
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.foreign == [], self.foreign


def as_alice(server: RunningServer) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {ALICE}"}, timeout=120
    )


@pytest.fixture
def console(browser: Browser, server: RunningServer, tmp_path: Path) -> Iterator[Console]:
    """The page as alice: her key is in the page's storage, as after she typed it once."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    # (the top page only: a sandboxed frame, the eval report's, has no storage)
    ctx.add_init_script(
        f"if (window === window.top) localStorage.setItem('llmos-api-key', {ALICE!r})"
    )
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)  # (a waiting assertion's own default is 5 s)
    c = Console(page, tmp_path)
    page.on("console", lambda m: m.type == "error" and c.errors.append(m.text))
    page.on("pageerror", lambda e: c.errors.append(f"pageerror: {e}"))
    page.on(
        "request",
        lambda r: r.url.startswith(server.url) or c.foreign.append(r.url),
    )
    page.goto(server.url + "/")
    expect(page.locator("body[data-ready='1']")).to_be_attached()
    yield c
    c.assert_clean()
    ctx.close()


@pytest.fixture(autouse=True)
def _idle_after(llm: LLM) -> Iterator[None]:
    yield
    deadline = time.monotonic() + 30
    while llm.engine.has_unfinished_requests() or llm.engine.blocks.num_used:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


def test_the_page_loads_clean_and_offline(console: Console, server: RunningServer) -> None:
    page = console.page
    expect(page.locator("#model")).to_have_text("smollm2-135m")
    expect(page.locator("#spawn-program option")).to_have_count(2)
    for tab in ("processes", "engine", "usage", "evals", "chat"):
        page.click(f"button.tab[data-tab='{tab}']")
        expect(page.locator(f"#tab-{tab}")).to_be_visible()
    console.shot("loaded")
    assert httpx.get(f"{server.url}/console").text == httpx.get(f"{server.url}/").text
    assert httpx.get(f"{server.url}/console/nope.js").status_code == 404


def test_a_chat_message_streams_an_answer(console: Console) -> None:
    page = console.page
    page.fill("#s-temperature", "0")
    page.fill("#s-max_tokens", "24")
    # count the answer's updates as they land: a stream shows it several times, growing
    page.evaluate("""() => { window.updates = []; new MutationObserver(() => {
        const m = document.querySelector('.msg.assistant .content');
        if (m) window.updates.push(m.textContent); })
        .observe(document.querySelector('#chat-log'),
                 {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant.done .content")
    expect(answer).not_to_be_empty()
    text = answer.inner_text()
    assert "Paris" in text, text
    updates = [u for u in page.evaluate("window.updates") if u]
    growing = [u for i, u in enumerate(updates) if i == 0 or u != updates[i - 1]]
    # streamed, not set once: a part of the answer showed before all of it
    assert len(growing) >= 2 and len(growing[0]) < len(text), updates
    assert all(text.startswith(u) for u in growing), growing
    expect(page.locator("#chat-stats")).to_contain_text("tokens in")
    console.shot("chat")
    # a JSON schema constrains the answer
    page.fill(
        "#s-schema",
        '{"type": "object", "properties": {"city": {"type": "string"}},'
        ' "required": ["city"], "additionalProperties": false}',
    )
    page.fill("#chat-input", "Name a city.")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant.done")).to_have_count(2)
    assert set(json.loads(page.locator(".msg.assistant.done .content").nth(1).inner_text())) == {
        "city"
    }


def test_the_playground_streams_a_tool_call(console: Console) -> None:
    page = console.page
    page.fill("#s-temperature", "0")
    page.fill("#s-max_tokens", "48")
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    page.fill("#s-tools", json.dumps([tool]))
    page.select_option("#s-tool_choice", "required")
    page.fill("#chat-input", "What is the weather in Paris?")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant.done .content")
    expect(answer).to_contain_text("→ get_weather(")
    args = answer.inner_text().split("→ get_weather(", 1)[1].rsplit(")", 1)[0]
    assert set(json.loads(args)) == {"city"}, args
    console.shot("chat-tool-call")


def test_a_spawned_process_appears_and_reaches_done(console: Console) -> None:
    page = console.page
    page.click("button.tab[data-tab='processes']")
    page.select_option("#spawn-program", "quick")
    page.fill("#spawn-input", "What is 2 + 2?")
    page.click("#spawn-form button[type=submit]")
    row = page.locator("#proc-table tbody tr").first
    expect(row).to_be_visible()
    pid = row.get_attribute("data-pid")
    expect(page.locator(f"#proc-table tr[data-pid='{pid}'][data-status='done']")).to_be_visible()
    expect(page.locator("#detail-status")).to_have_text("done")
    expect(page.locator("#detail-steps .step.final_answer")).to_have_count(1)
    expect(page.locator("#detail-answer")).not_to_be_empty()
    console.shot("process-done")


def test_an_approval_clicked_in_the_page_unblocks_the_process(
    console: Console, server: RunningServer
) -> None:
    page = console.page
    page.click("button.tab[data-tab='processes']")
    page.select_option("#spawn-program", "approver")
    page.fill("#spawn-input", "Write hello to notes.txt")
    page.click("#spawn-form button[type=submit]")
    approve = page.locator("#detail-approvals .approval button.approve")
    expect(approve).to_be_visible()
    expect(page.locator("#detail-status")).to_have_text("waiting_approval")
    pid = int(page.locator("#detail-pid").inner_text())
    with as_alice(server) as c:
        assert c.get(f"/processes/{pid}").json()["status"] == "waiting_approval"
    expect(page.locator("#detail-approvals code")).to_contain_text("write_file(")
    console.shot("approval-waiting")
    approve.click()
    expect(page.locator("#detail-status")).to_have_text("done")
    expect(page.locator("#detail-steps .step.approval")).to_contain_text("allowed")
    expect(page.locator("#detail-steps .step.tool_result.ok")).to_have_count(1)
    expect(page.locator("#detail-approvals .approval")).to_have_count(0)
    console.shot("approval-done")
    with as_alice(server) as c:
        steps = c.get(f"/processes/{pid}").json()["transcript"]["steps"]
    assert [s["allow"] for s in steps if s["kind"] == "approval"] == [True]


def test_the_engine_charts_receive_data(console: Console, server: RunningServer) -> None:
    page = console.page
    page.click("button.tab[data-tab='engine']")
    # load while the page watches: a completion the charts must see as throughput
    with as_alice(server) as c:
        r = c.post(
            "/completions",
            json={"prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True},
        )
    assert r.status_code == 200
    page.wait_for_function("state.samples.some(s => s.tokens_per_second > 0)")
    page.wait_for_function("state.samples.length >= 4")
    for chart in ("throughput", "kv", "queue", "cache"):
        points = int(page.locator(f"#chart-{chart}").get_attribute("data-points") or 0)
        assert points >= 4, chart
    total = page.evaluate("state.samples[state.samples.length - 1].kv_blocks_total")
    assert total > 0
    expect(page.locator(".readout[data-key='KV']")).to_contain_text(f"/{total}")
    # the canvas has ink on it
    inked = page.evaluate(
        """() => { const c = document.querySelector('#chart-throughput');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""
    )
    assert inked > 100
    console.shot("engine")


def test_usage_shows_users_programs_and_budgets(console: Console, server: RunningServer) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for user in ("alice", "carol"):
        r = httpx.post(
            f"{server.url}/v1/usage/budgets",
            json={"user": user, "max_tokens": 1_000_000},
            headers=admin,
        )
        assert r.status_code == 200, r.text
    page = console.page
    page.click("button.tab[data-tab='usage']")
    expect(page.locator("#usage-programs tbody tr").first).to_contain_text("alice")
    expect(page.locator("#usage-budgets tbody")).to_contain_text("of 1,000,000")
    # her own budget only, and no form to set one (an admin's)
    expect(page.locator("#usage-budgets tbody tr")).to_have_count(1)
    expect(page.locator("#usage-budgets tbody")).to_contain_text("alice")
    expect(page.locator("#budget-form")).to_be_hidden()
    console.shot("usage")


def test_eval_reports_open_from_the_history(console: Console, server: RunningServer) -> None:
    run_id = json.loads(EVAL_RESULT.read_text())["run_id"]
    page = console.page
    page.click("button.tab[data-tab='evals']")
    row = page.locator("#eval-runs tbody tr", has_text=run_id)
    expect(row).to_contain_text("default-agent")
    row.click()
    frame = page.frame_locator("#eval-frame")
    expect(frame.locator("h1")).to_contain_text("llmos eval: default-agent")
    expect(frame.locator("body")).to_contain_text("The launch code is 7431.")
    console.shot("evals")
    with as_alice(server) as c:
        missing = c.get("/console/evals/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "run_id"


def test_a_key_typed_in_the_page_is_used(browser: Browser, server: RunningServer) -> None:
    """Without a key the page says why; typed in, it is kept, and she sees only her own."""
    with as_alice(server) as c:
        theirs = httpx.post(
            f"{server.url}/v1/processes",
            json={"program": "quick", "input": "hi"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        ).json()["pid"]
        mine = c.post("/processes", json={"program": "quick", "input": "hi"}).json()["pid"]
    ctx = browser.new_context()
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(server.url + "/")
    expect(page.locator("#banner")).to_contain_text("Missing API key", timeout=TIMEOUT_MS)
    # the browser logs the refused fetch itself; nothing else may be logged
    assert all("401" in e for e in errors), errors
    page.fill("#api-key", ALICE)
    page.press("#api-key", "Enter")
    expect(page.locator("body[data-ready='1']")).to_be_attached(timeout=TIMEOUT_MS)
    expect(page.locator("#whoami")).to_have_text("alice")
    page.click("button.tab[data-tab='processes']")
    expect(page.locator(f"#proc-table tr[data-pid='{mine}']")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator(f"#proc-table tr[data-pid='{theirs}']")).to_have_count(0)
    expect(page.locator("#proc-table tbody tr td:nth-child(3)").first).to_have_text("alice")
    with as_alice(server) as c:
        deadline = time.monotonic() + 120
        while c.get(f"/processes/{mine}").json()["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        while httpx.get(f"{server.url}/v1/processes/{theirs}", headers=admin).json()[
            "status"
        ] not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    ctx.close()
