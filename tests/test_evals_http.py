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


CHOICES = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid"]),
    ("Two plus two equals", [" four", " seven", " purple"]),
    ("The opposite of hot is", [" cold", " loud", " Tuesday"]),
]


def test_choices_score_the_same_locally_and_over_http(server: str, tmp_path: Path) -> None:
    """Log-likelihood choices on an http provider: /tokenize, then one /v1/completions with
    echo and logprobs per case; the scores are the local engine's own prompt logprobs."""
    tests = "\n".join(
        f"  - {{id: q{i}, vars: {{q: {json.dumps(q)}}}, choices: {json.dumps(cs)}, answer: 0}}"
        for i, (q, cs) in enumerate(CHOICES)
    )
    suite = tmp_path / "choices.yaml"
    suite.write_text(f"""
prompts: ["{{{{q}}}}"]
providers:
  - {{id: local:smollm2-135m, label: local}}
  - {{id: "openai_http:smollm2-135m@{server}/v1", label: http}}
tests:
{tests}
""")
    result = CliRunner().invoke(app, ["eval", str(suite), "--no-store", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "result.json").read_text())
    scores: dict[tuple[str, str], list[float]] = {}
    for c in data["cases"]:
        label = c["cell"].split("-", 1)[1]
        scores[(label, c["test"])] = [t["logprob"] for t in c["transcript"]]
        assert c["passed"], c  # each right answer is the likeliest here
        assert c["prompt_tokens"] > 0
    for i, (_, cs) in enumerate(CHOICES):
        local, http = scores[("local", f"q{i}")], scores[("http", f"q{i}")]
        assert len(local) == len(http) == len(cs)
        assert all(v < 0 for v in local), local
        assert http == pytest.approx(local, abs=2e-3), (local, http)


def test_choices_over_http_without_tokenize(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server with no /tokenize (a 404 here): the choice's tokens are found by the echoed
    tokens' text offsets, and score as with /tokenize."""
    import asyncio

    from llmos.backends.openai_http import OpenAIHTTPBackend
    from llmos.evals import choices

    async def both() -> tuple[list, list]:
        backend = OpenAIHTTPBackend(f"{server}/v1", "smollm2-135m")
        try:
            with_ids = await choices.http_logprobs(backend, *CHOICES[0])
            monkeypatch.setattr(choices, "_root", lambda b: f"{server}/no-such-place")
            by_offsets = await choices.http_logprobs(backend, *CHOICES[0])
        finally:
            await backend.aclose()
        return with_ids, by_offsets

    with_ids, by_offsets = asyncio.run(both())
    assert [s[1] for s in with_ids] == [s[1] for s in by_offsets]  # the same prompt tokens
    assert [s[0] for s in by_offsets] == pytest.approx([s[0] for s in with_ids], abs=1e-4)


PROMPTFOO = """# a promptfoo config, as promptfoo's getting-started writes one
description: "Translation"

prompts:
  - "Convert the following English text to {{language}}: {{input}}"
  - file://translate.json

providers:
  - id: openai:chat:smollm2-135m
    config:
      temperature: 0
      max_tokens: 24

defaultTest:
  vars:
    language: French
  assert:
    - type: not-icontains
      value: "As an AI language model"
    - type: latency
      threshold: 600000

tests:
  - vars:
      input: Hello world
  - vars:
      language: Spanish
      input: Where is the library?
    assert:
      - type: javascript
        value: output.length > 0
"""


def test_a_promptfoo_config_runs_unchanged(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """promptfoo's own shape against llmos serve, with only OPENAI_BASE_URL set (as one points
    promptfoo at a local server): prompts (text and a file:// chat), providers with config,
    defaultTest vars and asserts, tests with vars and assert. A `javascript` assertion is the
    one part llmos cannot run: it is named as a configuration error (exit 2), not skipped."""
    (tmp_path / "translate.json").write_text(json.dumps([
        {"role": "system", "content": "You translate English into {{language}}."},
        {"role": "user", "content": "{{input}}"},
    ]))  # fmt: skip
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server}/v1")
    config = tmp_path / "promptfooconfig.yaml"
    config.write_text(PROMPTFOO)
    args = ["eval", str(config), "--no-store", "--out", str(tmp_path)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "tests[1].assert[0].type" in refused.output
    assert "unknown assertion 'javascript'" in refused.output
    python = PROMPTFOO.replace("type: javascript", "type: python").replace(
        "output.length > 0", "len(output) > 0"
    )  # promptfoo's inline python form of the same check
    config.write_text(python)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "result.json").read_text())
    assert [c["config"]["prompt"] for c in data["cells"]] == ["prompt-1", "translate"]
    assert len(data["cases"]) == 4
    for c in data["cases"]:
        assert c["status"] == "done" and c["output"].strip() and c["prompt_tokens"] > 0, c
        kinds = [a["type"] for a in c["assertions"]]
        assert kinds[:2] == ["not-icontains", "latency"], kinds  # defaultTest's come first
        assert c["passed"], c
    # the file:// chat prompt went as its messages, rendered with each test's vars
    sent = {c["test"]: c["prompt_tokens"] for c in data["cases"] if "translate" in c["cell"]}
    tests = {"test-1": ("French", "Hello world"), "test-2": ("Spanish", "Where is the library?")}
    for test, (language, text) in tests.items():
        messages = [
            {"role": "system", "content": f"You translate English into {language}."},
            {"role": "user", "content": text},
        ]
        r = httpx.post(f"{server}/tokenize", json={"messages": messages}, timeout=60)
        assert sent[test] == r.json()["count"], (test, sent, r.json())
