"""The HTML eval report (`llmos.evals.html.render_html`) opened in a real headless Chromium.

Debian's `chromium` (installed by `make test`'s stamp target) is driven by Playwright. Each page
is opened from a file:// URL, as a user opens a report from CI, and must log no console error,
make no request beyond its own file, and show the numbers of the result JSON as text.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, sync_playwright

from llmos.evals.html import render_html
from llmos.evals.svg import (
    fmt_cost,
    fmt_int,
    fmt_rate,
    fmt_seconds,
    histogram,
    pareto_front,
)

CHROMIUM = "/usr/bin/chromium"
FIXTURE = Path(__file__).parent / "fixtures" / "eval_result.json"
EVIL = '</pre></td><script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def result() -> dict:
    return json.loads(FIXTURE.read_text())


@dataclass
class Opened:
    page: Page
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def text(self, selector: str = "body") -> str:
        return self.page.inner_text(selector)

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.requests == [self.url], self.requests


@pytest.fixture
def open_report(browser: Browser, tmp_path: Path) -> Iterator:
    contexts = []

    def _open(result: dict, name: str = "report.html") -> Opened:
        path = tmp_path / name
        path.write_text(render_html(result), encoding="utf-8")
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        contexts.append(ctx)
        opened = Opened(ctx.new_page(), url=path.as_uri())
        page = opened.page
        page.on("console", lambda m: m.type == "error" and opened.errors.append(m.text))
        page.on("pageerror", lambda e: opened.errors.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: opened.errors.append(f"failed: {r.url}"))
        page.on("request", lambda r: opened.requests.append(r.url))
        page.goto(opened.url, wait_until="load")
        return opened

    yield _open
    for ctx in contexts:
        ctx.close()


def open_sections(page: Page) -> None:
    page.evaluate("document.querySelectorAll('details.section').forEach(d => d.open = true)")


def case_row(page: Page, case: dict) -> Locator:
    sel = f'tr[data-cell="{case["cell"]}"][data-test="{case["test"]}"]'
    row = page.locator(f'{sel}[data-repeat="{case["repeat"]}"]')
    assert row.count() == 1, sel
    return row


def test_report_shows_the_numbers_of_the_json(open_report, result: dict) -> None:
    result["cells"][1]["pass_k_wilson"] = [0.125, 0.75]  # pass^k's interval, where a run has it
    r = open_report(result)
    r.assert_clean()
    page = r.page
    assert page.title() == "llmos eval: default-agent"
    top = r.text("p.summary")
    assert result["run_id"] in top and "evals/agent.yaml" in top and "74.318 s" in top
    assert "2026-11-29 13:45:12 UTC" in top and "4 cells, 48 cases" in top
    assert "a gate failed" in top  # the fixture's third gate fails

    rows = page.locator("table.cells tbody tr")
    assert rows.count() == len(result["cells"])
    # one cell spelled out, so a format change is seen here and not only through fmt_*
    first = rows.nth(0).inner_text()
    for s in (
        "default",
        "local:smollm2-135m",
        "6/12",
        "50.0%",
        "25.4% – 74.6%",
        "0.0% (k=3)",
        "3,735",
        "378",
        "$0.000262",
        "1.110 s",
        "2.360 s",
    ):
        assert s in first, (s, first)
    for i, cell in enumerate(result["cells"]):
        row = rows.nth(i).inner_text()
        lo, hi = cell["wilson"]
        for s in (
            cell["label"],
            f"{cell['passed']}/{cell['total']}",
            fmt_rate(cell["pass_rate"]),
            f"{fmt_rate(lo)} – {fmt_rate(hi)}",
            fmt_rate(cell["pass_k"]),
            fmt_int(cell["prompt_tokens"]),
            fmt_int(cell["completion_tokens"]),
            fmt_cost(cell["cost"]),
            fmt_seconds(cell["latency_p50"]),
            fmt_seconds(cell["latency_p95"]),
            'quantization="q8"' if "q8" in cell["id"] else 'quantization="auto"',
        ):
            assert s in row, (s, row)
        if cell.get("pass_k_wilson"):
            assert f"{fmt_rate(0.125)} – {fmt_rate(0.75)}; k=" in row, row

    gates = page.locator("table.gates tbody tr")
    assert gates.count() == 3
    for i, gate in enumerate(result["gates"]):
        row = gates.nth(i).inner_text()
        assert gate["name"] in row and gate["detail"] in row
        assert ("pass" if gate["passed"] else "fail") in row

    flips = r.text("h2:has-text('Flips') + p")
    assert "run-20261130-091200-11c2" in flips and "3 flips (2 regressions, 1 fixed)" in flips
    flip_rows = page.locator("table.flips tbody tr")
    assert flip_rows.count() == 3
    assert "tool grammar off" in flip_rows.nth(2).inner_text()  # the cell's label, not its id
    assert "regression" in flip_rows.nth(2).inner_text()
    assert "fixed" in flip_rows.nth(1).inner_text()

    # failed cases first, in the open; passed ones folded in a closed section
    failed = page.locator("table.cases.failed tbody tr")
    passed = page.locator("table.cases.passed tbody tr")
    assert failed.count() == sum(not c["passed"] for c in result["cases"]) > 0
    assert passed.count() == sum(c["passed"] for c in result["cases"]) > 0
    assert f"{failed.count()} failed cases" in r.text()
    assert failed.first.is_visible() and not passed.first.is_visible()
    assert all("fail" in failed.nth(i).inner_text() for i in range(failed.count()))
    open_sections(page)
    assert passed.first.is_visible()
    case = result["cases"][3]
    row = case_row(page, case).inner_text()
    for s in (
        case["test"],
        case["description"],
        fmt_seconds(case["latency_s"]),
        fmt_cost(case["cost"]),
        case["output"],
        case["assertions"][0]["type"],
    ):
        assert s in row, (s, row)

    # the data block is the result itself, for tools
    data = json.loads(page.locator("script#eval-result").text_content() or "")
    assert data == result


def test_the_plots_draw_the_numbers(open_report, result: dict) -> None:
    r = open_report(result)
    r.assert_clean()
    page = r.page
    assert page.locator("svg").count() == 3
    # accuracy: bar lengths are proportional to the pass rates (measured in the rendered page)
    bars = page.locator("svg[aria-label='Accuracy by cell'] rect.bar")
    assert bars.count() == len(result["cells"])
    widths = [bars.nth(i).bounding_box()["width"] for i in range(bars.count())]
    rates = [c["pass_rate"] for c in result["cells"]]
    best = max(range(len(rates)), key=rates.__getitem__)
    for w, rate in zip(widths, rates, strict=True):
        assert w == pytest.approx(widths[best] * rate / rates[best], abs=0.6)
    assert page.locator("svg[aria-label='Accuracy by cell'] line.whisker").count() == 3 * 4
    # Pareto: default (cheapest) and deterministic (most accurate) are the front
    pareto = page.locator("svg[aria-label='Cost against accuracy']")
    assert pareto.locator("circle").count() == 4
    assert pareto.locator("circle.front-pt").count() == 2
    assert "Pareto front (filled points): 1. default, 2. deterministic" in r.text()
    # latency histogram: the bins count every case once, and the table says the same
    hist = page.locator("table.latency tbody tr")
    counts = [int(hist.nth(i).inner_text().split("\t")[-1]) for i in range(hist.count())]
    assert sum(counts) == len(result["cases"])
    assert page.locator("svg[aria-label='Latency histogram'] rect.bar").count() == len(counts)
    bins = histogram([c["latency_s"] for c in result["cases"]])
    assert counts == [n for _, _, n in bins]


def test_model_output_is_shown_as_text_never_run(open_report, result: dict) -> None:
    result["cases"][0]["output"] = EVIL
    result["cases"][0]["assertions"][0]["reason"] = EVIL
    result["cells"][0]["label"] = EVIL
    result["suite"]["name"] = EVIL
    result["baseline"]["flips"][0]["test"] = EVIL
    r = open_report(result)
    r.assert_clean()  # the <img src="x"> would have been a request
    page = r.page
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 1  # the JSON data block only
    assert page.locator("script[type='application/json']").count() == 1
    open_sections(page)
    first_case = case_row(page, result["cases"][0]).inner_text()
    assert first_case.count(EVIL) == 3  # cell label, output, assertion reason: as text
    assert EVIL in page.locator("table.cells tbody tr").nth(0).inner_text()
    assert EVIL in r.text("h1") and EVIL in page.title()
    assert EVIL in page.locator("table.flips tbody tr").nth(0).inner_text()
    assert json.loads(page.locator("script#eval-result").text_content() or "") == result


def test_an_empty_run_with_no_baseline(open_report, result: dict) -> None:
    empty = {**result, "cells": [], "cases": [], "gates": [], "baseline": None}
    r = open_report(empty)
    r.assert_clean()
    text = r.text()
    assert "No cells: the run evaluated no configuration." in text
    assert "No baseline: run with --baseline last to list flips." in text
    assert "No gates were set for this run." in text and "No cases." in text
    assert "no cells in this run" in text and "no case latencies in this run" in text
    assert "0 cells, 0 cases" in text
    assert r.page.locator("table").count() == 0


def test_thirty_cells_and_long_outputs(open_report, result: dict) -> None:
    base_cell, base_case = result["cells"][0], result["cases"][0]
    cells, cases = [], []
    long_output = "".join(f"line {i}: the model went on and on & on <ok>\n" for i in range(400))
    for i in range(30):
        cell = copy.deepcopy(base_cell)
        cell.update(
            id=f"cell-{i}",
            label=f"temperature={i / 10:.1f} seed={i}",
            passed=i % 13,
            total=12,
            pass_rate=(i % 13) / 12,
            cost=1e-5 * (i + 1),
        )
        cells.append(cell)
        case = copy.deepcopy(base_case)
        case.update(
            cell=cell["id"], output=long_output if i == 7 else f"answer {i}", latency_s=0.1 * i
        )
        cases.append(case)
    r = open_report({**result, "cells": cells, "cases": cases, "baseline": None})
    r.assert_clean()
    page = r.page
    rows = page.locator("table.cells tbody tr")
    assert rows.count() == 30
    for i in (0, 17, 29):
        assert f"temperature={i / 10:.1f} seed={i}" in rows.nth(i).inner_text()
    # the bars stack downwards without overlapping
    bars = page.locator("svg[aria-label='Accuracy by cell'] rect.bar")
    boxes = [bars.nth(i).bounding_box() for i in range(30)]
    for above, below in zip(boxes, boxes[1:], strict=False):
        assert below["y"] >= above["y"] + above["height"]
    assert page.locator("svg[aria-label='Cost against accuracy'] circle").count() == 30
    # a long output is folded: a preview, and the whole text inside <details>
    open_sections(page)
    long_row = case_row(page, cases[7])
    full = long_row.locator("details > pre.out")
    assert full.text_content() == long_output
    assert not full.is_visible()
    long_row.locator("summary").click()
    assert full.is_visible()
    assert "line 399: the model went on and on & on <ok>" in long_row.inner_text()


def test_local_cells_that_cost_nothing_plot_tokens(open_report, result: dict) -> None:
    for cell in result["cells"]:
        cell["cost"] = 0.0
    r = open_report(result)
    r.assert_clean()
    svg = r.page.locator("svg[aria-label='Cost against accuracy']")
    assert "tokens (every cell cost $0)" in (svg.text_content() or "")
    assert "$0.000000" in r.text("table.cells")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("run_id"), "result.run_id: missing"),
        (lambda r: r["cells"][2].update(pass_rate="high"), "result.cells[2].pass_rate: expected"),
        (lambda r: r["cells"][0].pop("wilson"), "result.cells[0].wilson: missing"),
        (lambda r: r["cells"][1].update(passed=True), "result.cells[1].passed: expected int"),
        (lambda r: r["cases"][5].update(passed="yes"), "result.cases[5].passed: expected bool"),
        (lambda r: r["gates"][0].pop("name"), "result.gates[0].name: missing"),
        (lambda r: r["baseline"]["flips"][1].pop("now"), "result.baseline.flips[1].now: missing"),
        (lambda r: r.update(cells={}), "result.cells: expected list"),
    ],
)
def test_bad_input_names_the_field(result: dict, edit, message: str) -> None:
    edit(result)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render_html(result)


def test_nulls_and_a_cell_that_ran_nothing(open_report, result: dict) -> None:
    result["cells"][0]["pass_k"] = None
    result["cells"][1]["latency_p95"] = float("nan")
    result["cells"][2].update(passed=0, total=0, pass_rate=None, wilson=[0.0, 1.0])
    result["cases"] = [c for c in result["cases"] if c["cell"] != result["cells"][2]["id"]]
    result["cases"][0]["cell"] = "a-cell-this-run-lacks"  # shown by its id
    result["cases"][1]["output"] = None  # shown as an empty output
    assert "NaN" not in render_html(result)
    r = open_report(result)
    r.assert_clean()
    rows = r.page.locator("table.cells tbody tr")
    assert "—" in rows.nth(0).inner_text().split("\t")[7]  # no pass^k
    assert "n/a" in rows.nth(1).inner_text().split("\t")[-1]  # p95 NaN
    third = rows.nth(2).inner_text()
    assert "0/0" in third and "n/a" in third
    # the empty cell draws no bar and no Pareto point; the others do
    assert r.page.locator("svg[aria-label='Cost against accuracy'] circle").count() == 3
    bar = r.page.locator("svg[aria-label='Accuracy by cell'] rect.bar").nth(2)
    assert bar.get_attribute("width") == "0.0"
    open_sections(r.page)
    assert "a-cell-this-run-lacks" in r.text("#cases")
    assert case_row(r.page, result["cases"][1]).locator("pre.out").text_content() == ""
    data = json.loads(r.page.locator("script#eval-result").text_content() or "")
    assert data["cells"][1]["latency_p95"] is None  # valid JSON: NaN became null


def test_pareto_front_and_histogram() -> None:
    assert pareto_front([(1.0, 0.5), (2.0, 0.9), (2.0, 0.4), (3.0, 0.9), (0.5, 0.1)]) == [4, 0, 1]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]
    assert histogram([]) == []
    assert histogram([2.0, 2.0]) == [(2.0, 2.0, 2)]
    bins = histogram([0.0, 0.1, 0.5, 0.9, 1.0], bins=2)
    assert [n for _, _, n in bins] == [2, 3] and bins[-1][1] == 1.0


SUITE = """\
description: the report of a real run
prompts: ["{{q}}"]
providers: [local:smollm2-135m]
matrix:
  sampling: [{temperature: 0, max_tokens: 8}, {temperature: 1, seed: 3, max_tokens: 8}]
tests:
  - vars: {q: "What is the capital of France?"}
    assert: [{type: icontains, value: paris}]
  - vars: {q: "Repeat after me: <script>window.__pwned = 1</script>"}
    assert: [{type: not-contains, value: "<script>"}]
"""


def test_the_report_of_a_real_llmos_eval_run(open_report, tmp_path: Path) -> None:
    """`llmos eval --out DIR --html` on the real model writes a report that opens clean and
    shows the numbers of the result.json written beside it (Helper A's shape, not the fixture)."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from llmos.cli.main import app; app()", "eval", str(suite),
           "--out", str(out), "--html", "--no-store", "-q"]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode in (0, 1), run.stderr  # 1: a gate failed; 2 would be a config error
    result = json.loads((out / "result.json").read_text())
    assert (out / "report.html").read_text() == render_html(result)
    assert len(result["cells"]) == 2 and len(result["cases"]) == 4
    r = open_report(result)
    r.assert_clean()
    assert r.page.evaluate("window.__pwned") is None
    rows = r.page.locator("table.cells tbody tr")
    for i, cell in enumerate(result["cells"]):
        row = rows.nth(i).inner_text()
        for s in (f"{cell['passed']}/{cell['total']}", fmt_rate(cell["pass_rate"]),
                  fmt_cost(cell["cost"]), fmt_seconds(cell["latency_p50"])):  # fmt: skip
            assert s in row, (s, row)
    open_sections(r.page)
    outputs = r.text("#cases")
    for case in result["cases"]:
        assert case["output"].strip()[:40] in outputs
