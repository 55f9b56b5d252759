"""The kernel over HTTP: `/v1/processes` and `/v1/usage` on a real uvicorn server hosting a
kernel on the real embedded model, with three API keys (alice, bob, an admin).

The programs pin their tool choice (a forced `write_file`, then the answer), so the small
model's run is short and its shape known: spawn → waiting_approval → approve → done.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from llmos import LLM
from llmos.engine.async_engine import AsyncEngine
from llmos.kernel import Program
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread
from llmos.server.processes_host import ProcessHost
from llmos.server.state import ServerConfig
from llmos.server.users import Users, parse_keys

KEYS = {
    "sk-alice-0001": "alice",
    "sk-bob-00002": "bob",
    "sk-admin-003": {"user": "ops", "admin": True},
}
ALICE, BOB, ADMIN = "sk-alice-0001", "sk-bob-00002", "sk-admin-003"
ERROR_KEYS = {"message", "type", "param", "code"}


def quick() -> Program:
    return Program(
        name="quick",
        system_prompt="Answer in one short sentence.",
        sampling={"temperature": 0, "max_tokens": 8},
        limits={"max_steps": 2},
    )


def approver() -> Program:
    return Program(
        name="approver",
        system_prompt="You write notes to files.",
        tools=["write_file"],
        policy={"needs_approval": ["write_file"]},
        tool_choice=["write_file", "none"],
        sampling={"temperature": 0, "max_tokens": 48},
        limits={"max_steps": 3},
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspaces")


@pytest.fixture(scope="module")
def server(
    llm: LLM, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    db = tmp_path_factory.mktemp("kernel") / "kernel.db"
    engine = AsyncEngine(llm.engine)
    host = ProcessHost.on_engine(
        engine,
        db,
        workspace_root=root,
        users=Users(parse_keys(KEYS)),
        programs={"quick": quick, "approver": approver},
    )
    app = create_app(engine, ServerConfig(), host)
    with serve_in_thread(app) as running:
        yield running


@pytest.fixture(autouse=True)
def _idle_after(llm: LLM) -> Iterator[None]:
    """Each test ends with its processes finished; their KV pins go back on the engine thread
    just after the store says so, which the shared check (conftest) then reads."""
    yield
    deadline = time.monotonic() + 30
    while llm.engine.has_unfinished_requests() or llm.engine.blocks.num_used:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


def http(server: RunningServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"{server.url}/v1", headers=headers, timeout=120)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def wait_status(c: httpx.Client, pid: int, *wanted: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = c.get(f"/processes/{pid}").json()
        if p["status"] in wanted:
            return p
        assert time.monotonic() < deadline, f"process {pid} stuck in {p['status']}: {p}"
        time.sleep(0.1)


def test_spawn_runs_a_registered_program_to_done(server: RunningServer) -> None:
    with http(server, ALICE) as c:
        r = c.post("/processes", json={"program": "quick", "input": "What is 2 + 2?"})
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["object"] == "process" and p["owner"] == "alice" and p["program"] == "quick"
        done = wait_status(c, p["pid"], "done", "failed")
        assert done["status"] == "done", done
        assert done["answer"] and done["usage"]["completion_tokens"] > 0
        assert done["usage"]["total_tokens"] == (
            done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
        )
        kinds = [s["kind"] for s in done["transcript"]["steps"]]
        assert kinds[0] == "model_turn" and kinds[-1] == "final_answer", kinds
        # paging: one step at a time, the total stays
        page = c.get(f"/processes/{p['pid']}", params={"offset": 1, "limit": 1}).json()
        assert page["transcript"]["total"] == len(kinds)
        assert [s["seq"] for s in page["transcript"]["steps"]] == [1]
        # the workspace is a new folder under the root, alice's
        assert Path(done["workspace"]).parent.name == "alice"
        # the list (built from two queries, not a load each) says what the process says
        [listed] = [q for q in c.get("/processes").json()["data"] if q["pid"] == p["pid"]]
        assert listed == {**done, "transcript": None}


def test_inline_spec_and_its_errors_name_the_field(server: RunningServer, root: Path) -> None:
    spec = {"name": "inline", "system_prompt": "Be brief.", "sampling": {"max_tokens": 4}}
    with http(server, BOB) as c:
        r = c.post("/processes", json={"program": spec, "input": "hi", "workspace": "w1"})
        assert r.status_code == 200, r.text
        assert r.json()["workspace"] == str((root / "bob" / "w1").resolve())
        wait_status(c, r.json()["pid"], "done", "failed")
        e = assert_error(c.post("/processes", json={"program": {"nme": "x"}}), 400, "program")
        assert "nme" in e["message"]
        assert_error(c.post("/processes", json={"program": "nope"}), 404, "program")
        assert_error(c.post("/processes", json={"program": "quick", "wrkspace": "x"}), 400)
        assert_error(c.post("/processes", content=b"{not json"), 400)
        assert_error(c.post("/processes", json={"program": "quick", "priority": 1000}), 400)
        # a non-admin's inline spec cannot reach past the engine or the sandbox
        for bad, param in (
            ({"model": "openai_http:x@http://example.com"}, "program.model"),
            ({"source": "/etc/evil.py"}, "program.source"),
            ({"tools": ["run_command"], "policy": {"commands": ["sh"]}}, "program.policy.commands"),
        ):
            assert_error(c.post("/processes", json={"program": bad}), 403, param)


def test_workspaces_are_confined_to_the_root(server: RunningServer, root: Path) -> None:
    """A user's workspaces lie in their own folder of the root; an admin's anywhere in it."""
    mine = root / "alice"
    mine.mkdir(exist_ok=True)
    (root / "bob" / "w1").mkdir(parents=True, exist_ok=True)
    with http(server, ALICE) as c:
        for path in ("../outside", "/etc", "a/../../x", str(root.parent), "../bob/w1", str(root)):
            e = assert_error(
                c.post("/processes", json={"program": "quick", "workspace": path}), 403, "workspace"
            )
            assert e["code"] == "workspace_outside_root"
        (mine / "afile").write_text("x")
        assert_error(
            c.post("/processes", json={"program": "quick", "workspace": "afile"}), 400, "workspace"
        )
        # a symlink inside the root that leads out is outside too
        (mine / "link").symlink_to(root / "bob")
        assert_error(
            c.post("/processes", json={"program": "quick", "workspace": "link"}), 403, "workspace"
        )
    with http(server, ADMIN) as c:  # the admin may name bob's folder; it stays inside the root
        r = c.post("/processes", json={"program": "quick", "workspace": "bob/w1"})
        assert r.status_code == 200 and r.json()["workspace"] == str(
            (root / "bob" / "w1").resolve()
        )
        wait_status(c, r.json()["pid"], "done", "failed")
        assert_error(
            c.post("/processes", json={"program": "quick", "workspace": str(root.parent)}),
            403,
            "workspace",
        )


def test_an_approval_over_http_unblocks_the_process(server: RunningServer, root: Path) -> None:
    with http(server, ALICE) as c:
        pid = c.post("/processes", json={"program": "approver", "input": "Write hi to a.txt"})
        pid = pid.json()["pid"]
        p = wait_status(c, pid, "waiting_approval")
        [pending] = p["pending_approvals"]
        assert pending["name"] == "write_file" and json.loads(pending["arguments"])
        e = assert_error(
            c.post(f"/processes/{pid}/approve", json={"call_id": "nope"}), 409, "call_id"
        )
        assert pending["call_id"] in e["message"]
        assert_error(c.post(f"/processes/{pid}/approve", json={"allow": True}), 400, "call_id")
        # the events stream sees the decision, the tool's result and the end
        with c.stream("GET", f"/processes/{pid}/events") as events:
            r = c.post(f"/processes/{pid}/approve", json={"call_id": pending["call_id"]})
            assert r.status_code == 200, r.text
            seen = [line for line in events.iter_lines() if line.startswith("data: ")]
        assert seen[-1] == "data: [DONE]"
        data = [json.loads(line[6:]) for line in seen[:-1]]
        steps = [d["step"]["kind"] for d in data if d["type"] == "process.step"]
        assert "approval" in steps and "tool_result" in steps, steps
        seqs = [d["step"]["seq"] for d in data if d["type"] == "process.step"]
        assert seqs == list(range(len(seqs))), seqs  # each step once, in order
        assert data[-1]["type"] == "process.done"
        assert data[-1]["process"]["status"] == "done", data[-1]
        written = Path(data[-1]["process"]["workspace"]) / json.loads(pending["arguments"])["path"]
        assert written.is_file()
        assert_error(c.post(f"/processes/{pid}/kill"), 409, "pid")


def test_kill_stops_a_waiting_process(server: RunningServer) -> None:
    with http(server, BOB) as c:
        pid = c.post("/processes", json={"program": "approver", "input": "Write x"}).json()["pid"]
        wait_status(c, pid, "waiting_approval")
        r = c.post(f"/processes/{pid}/kill")
        assert r.status_code == 200 and r.json()["status"] == "killed", r.text
        assert r.json()["pending_approvals"] == []


def test_users_cannot_reach_each_others_processes_by_any_route(server: RunningServer) -> None:
    with http(server, ALICE) as alice, http(server, BOB) as bob, http(server, ADMIN) as admin:
        pid = alice.post("/processes", json={"program": "approver", "input": "Write a"})
        pid = pid.json()["pid"]
        p = wait_status(alice, pid, "waiting_approval")
        call_id = p["pending_approvals"][0]["call_id"]
        for method, path, body in (
            ("GET", f"/processes/{pid}", None),
            ("GET", f"/processes/{pid}/events", None),
            ("POST", f"/processes/{pid}/kill", None),
            ("POST", f"/processes/{pid}/approve", {"call_id": call_id}),
        ):
            e = assert_error(bob.request(method, path, json=body), 404, "pid")
            assert e["code"] == "process_not_found"
            # the same answer as for a pid that does not exist: nothing is revealed
            missing = bob.request(method, path.replace(str(pid), "999999"), json=body)
            assert missing.json()["error"]["message"] == e["message"].replace(str(pid), "999999")
        assert pid not in [q["pid"] for q in bob.get("/processes").json()["data"]]
        assert all(q["owner"] == "bob" for q in bob.get("/processes").json()["data"])
        assert all(r["user"] == "bob" for r in bob.get("/usage").json()["by_user"])
        assert bob.get("/usage", params={"user": "alice"}).json()["user"] == "bob"
        # still waiting: bob's refusals changed nothing
        assert alice.get(f"/processes/{pid}").json()["status"] == "waiting_approval"
        # the admin sees and controls it
        assert pid in [q["pid"] for q in admin.get("/processes").json()["data"]]
        only = admin.get("/processes", params={"user": "bob"}).json()["data"]
        assert only and all(q["owner"] == "bob" for q in only)
        assert admin.post(f"/processes/{pid}/approve", json={"call_id": call_id, "allow": False})
        done = wait_status(alice, pid, "done", "failed")
        results = [s for s in done["transcript"]["steps"] if s["kind"] == "tool_result"]
        assert results and not results[0]["ok"] and "denied" in results[0]["error"]


def test_keys_are_checked_on_every_route(server: RunningServer) -> None:
    for key in (None, "sk-wrong-999"):
        with http(server, key) as c:
            for method, path in (
                ("GET", "/processes"),
                ("POST", "/processes"),
                ("GET", "/processes/1"),
                ("GET", "/usage"),
                ("POST", "/chat/completions"),
            ):
                e = assert_error(c.request(method, path, json={}), 401)
                assert e["code"] == "invalid_api_key"
    # the generation routes take every user's key, through the official client
    client = OpenAI(base_url=f"{server.url}/v1", api_key=BOB, max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong-999", max_retries=0).models.list()


def test_usage_by_user_and_program_and_budgets(server: RunningServer) -> None:
    with http(server, ALICE) as alice, http(server, ADMIN) as admin:
        pid = alice.post("/processes", json={"program": "quick", "input": "Say hi"}).json()["pid"]
        wait_status(alice, pid, "done", "failed")
        u = alice.get("/usage").json()
        assert u["object"] == "usage" and u["user"] == "alice"
        [row] = [r for r in u["by_program"] if r["program"] == "quick"]
        assert row["user"] == "alice" and row["completion_tokens"] > 0 and row["calls"] >= 1
        e = assert_error(alice.post("/usage/budgets", json={"user": "alice", "max_tokens": 1}), 403)
        assert e["code"] == "permission_denied"
        b = admin.post("/usage/budgets", json={"user": "alice", "max_tokens": 1})
        assert b.status_code == 200 and b.json()["used_tokens"] > 1, b.text
        assert_error(admin.post("/usage/budgets", json={"user": "alice", "max_tokens": -1}), 400)
        e = assert_error(alice.post("/processes", json={"program": "quick"}), 429)
        assert e["code"] == "insufficient_quota"
        budgets = alice.get("/usage").json()["budgets"]
        assert budgets == [b.json()]
        everyone = admin.get("/usage").json()
        assert everyone["user"] is None and {"alice", "bob"} <= {
            r["user"] for r in everyone["by_user"]
        }
        admin.post("/usage/budgets", json={"user": "alice", "max_tokens": None})
        again = alice.post("/processes", json={"program": "quick"})
        assert again.status_code == 200, again.text
        wait_status(alice, again.json()["pid"], "done", "failed")


def test_openapi_describes_the_routes(server: RunningServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    paths = doc["paths"]
    for path, method in (
        ("/v1/processes", "post"),
        ("/v1/processes", "get"),
        ("/v1/processes/{pid}", "get"),
        ("/v1/processes/{pid}/events", "get"),
        ("/v1/processes/{pid}/kill", "post"),
        ("/v1/processes/{pid}/approve", "post"),
        ("/v1/usage", "get"),
        ("/v1/usage/budgets", "post"),
    ):
        op = paths[path][method]
        assert "200" in op["responses"] and "404" in op["responses"], (path, op["responses"])
    schemas = doc["components"]["schemas"]
    assert {"SpawnRequest", "ApproveRequest", "ProcessInfo", "UsageReport"} <= set(schemas)
    body = paths["/v1/processes"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/SpawnRequest"}
    assert set(schemas["SpawnRequest"]["properties"]) == {
        "program",
        "input",
        "workspace",
        "priority",
    }


def test_llmos_serve_flags(tmp_path: Path) -> None:
    """`llmos serve` with --api-keys, --kernel-db, --workspace-root and --programs, as a user
    runs it; a bad flag fails before the model loads, naming it."""
    serve = [sys.executable, "-c", "from llmos.cli.main import app; app()", "serve", "--port", "0"]
    keys = tmp_path / "keys.yaml"
    keys.write_text("sk-alice-0001: alice\nshort: bob\n")
    bad = subprocess.run([*serve, "--api-keys", str(keys)], capture_output=True, text=True)
    assert bad.returncode == 2 and "key #2" in bad.stderr, bad.stderr
    bad = subprocess.run(
        [*serve, "--workspace-root", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--workspace-root" in bad.stderr, bad.stderr
    keys.write_text("sk-alice-0001: alice\n")
    (tmp_path / "programs").mkdir()
    (tmp_path / "programs" / "hello.yaml").write_text(
        "name: hello\nsampling: {temperature: 0, max_tokens: 4}\n"
    )
    db, root = tmp_path / "kernel.db", tmp_path / "ws"
    root.mkdir()
    flags = ["--api-keys", str(keys), "--kernel-db", str(db), "--workspace-root", str(root)]
    flags += ["--programs", str(tmp_path / "programs"), "--kv-cache-memory", "64MiB"]
    proc = subprocess.Popen([*serve, *flags], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = ""
        while "Ctrl+C" not in banner:
            line = proc.stdout.readline()
            assert line, "llmos serve exited"
            banner += line
        url = re.search(r"http://127\.0\.0\.1:\d+", banner).group(0)  # type: ignore[union-attr]
        assert f"The console: {url}/" in banner
        assert "llmos console" in httpx.get(url + "/").text
        with httpx.Client(base_url=f"{url}/v1", timeout=120) as c:
            assert c.get("/processes").status_code == 401
            c.headers["Authorization"] = "Bearer sk-alice-0001"
            pid = c.post("/processes", json={"program": "hello", "input": "hi"}).json()["pid"]
            assert wait_status(c, pid, "done", "failed")["status"] == "done"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # the process is in the kernel DB the flag named, owned by alice, in a folder of the root
    with sqlite3.connect(db) as con:
        owner, workspace, status = con.execute(
            "SELECT owner, workspace, status FROM processes WHERE pid = ?", (pid,)
        ).fetchone()
    assert (owner, status) == ("alice", "done")
    assert Path(workspace).is_relative_to(root.resolve())
