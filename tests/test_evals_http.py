"""`llmos eval` against a real `llmos serve` through the official openai client: the
openai_http provider, promptfoo's `openai:chat:MODEL` with `apiBaseUrl`, an llm-rubric judged
over HTTP, and a refused request that fails its case (with the server's reason) while the run
goes on and the server gets its KV blocks back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from llmos.cli.main import app


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from llmos.cli.main import app; app()", "serve", "--port", "0",
         "--kv-cache-memory", "128MiB"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    url, deadline = None, time.monotonic() + 300
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        url = m.group(1) if m else None
    assert url is not None, "llmos serve did not start"
    try:
        yield url
    finally:
        proc.kill()
        proc.wait(30)


def test_eval_over_http(server: str, tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
prompts: ["{{{{q}}}}"]
providers:
  - {{id: "openai_http:smollm2-135m@{server}/v1", label: http, config: {{temperature: 0, max_tokens: 16}}}}
  - {{id: "openai:chat:smollm2-135m", label: promptfoo, config: {{apiBaseUrl: "{server}/v1", temperature: 0, max_tokens: 16}}}}
tests:
  - id: capital
    vars: {{q: "What is the capital of France? Answer in one word."}}
    assert:
      - {{type: icontains, value: paris}}
      - {{type: llm-rubric, value: "It names a city.", provider: "openai_http:smollm2-135m@{server}/v1", weight: 0}}
  - id: refused
    vars: {{q: "hi"}}
    options: {{max_tokens: 100000000}}
    assert: [{{type: contains, value: x}}]
gates: {{test_pass_k: {{capital: 1.0}}}}
""")  # noqa: E501
    result = CliRunner().invoke(
        app, ["eval", str(suite), "--db", str(tmp_path / "h.db"), "--out", str(tmp_path)]
    )  # noqa: E501
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "result.json").read_text())
    by = {(c["cell"].split("-", 1)[1], c["test"]): c for c in data["cases"]}
    for label in ("http", "promptfoo"):
        ok = by[(label, "capital")]
        assert ok["passed"] and ok["tokens"] > 0 and ok["cost"] > 0, ok  # per-token prices
        assert ok["assertions"][1]["reason"].startswith("judge said")
        refused = by[(label, "refused")]
        assert not refused["passed"] and refused["status"] == "error"
        assert "max_tokens" in refused["error"], refused["error"]
    assert data["cells"][0]["model_hash"] is None  # a remote model: no file to hash
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    used = re.search(r"^llmos_kv_blocks_used (\S+)", metrics, re.MULTILINE)
    assert used is not None and float(used.group(1)) == 0.0, metrics[:2000]
