"""A self-contained HTML report of one `llmos eval` run.

`render_html(result)` reads the result JSON that `llmos eval` writes and returns one page:
no network, no scripts, no external CSS. The plots are inline SVG (`svg.py`: accuracy by cell
with Wilson intervals, cost against accuracy with its Pareto front, a latency histogram), and
every number in them is also in a table, so the page reads without the pictures. Model output
is untrusted text: everything is escaped, and a Content-Security-Policy forbids scripts and
network loads outright, so a slip in escaping shows up as a console error, not a running script.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

from llmos.evals.svg import (
    accuracy_chart,
    esc,
    finite,
    fmt_cost,
    fmt_int,
    fmt_rate,
    fmt_seconds,
    latency_chart,
    pareto_chart,
    short,
)

__all__ = ["render_html"]

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
OUTPUT_PREVIEW = 160  # characters of a case's output shown before the <details> fold

_CELL_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "label": (str,),
    "provider": (str,),
    "config": (dict,),
    "passed": (int,),
    "total": (int,),
    "pass_rate": (int, float),
    "pass_k": (int, float),
    "k": (int,),
    "wilson": (list, tuple),
    "prompt_tokens": (int,),
    "completion_tokens": (int,),
    "cost": (int, float),
    "latency_p50": (int, float),
    "latency_p95": (int, float),
}
_CASE_FIELDS: dict[str, tuple[type, ...]] = {
    "cell": (str,),
    "test": (str,),
    "passed": (bool,),
    "score": (int, float),
    "output": (str,),
    "latency_s": (int, float),
    "assertions": (list,),
}
# null is shown as n/a (or an empty output); the JSON shape allows it for pass_k, and a failed
# run may leave the others unset
_NULLABLE = {"pass_k", "pass_rate", "cost", "latency_p50", "latency_p95", "score", "latency_s",
             "output"}  # fmt: skip


def _check(obj: Any, fields: dict[str, tuple[type, ...]], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    for name, types in fields.items():
        if name not in obj:
            raise ValueError(f"{where}.{name}: missing")
        value = obj[name]
        if value is None and name in _NULLABLE:
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{where}.{name}: expected {want}, got {value!r:.60}")


def _validate(result: Any) -> None:
    """Bad input names its field (`result.cells[2].pass_rate: ...`); extra keys are fine."""
    _check(result, {"run_id": (str,), "suite": (dict,), "cells": (list,)}, "result")
    _check(result["suite"], {"name": (str,)}, "result.suite")
    for i, cell in enumerate(result["cells"]):
        _check(cell, _CELL_FIELDS, f"result.cells[{i}]")
    for i, case in enumerate(result.get("cases") or []):
        _check(case, _CASE_FIELDS, f"result.cases[{i}]")
    for i, gate in enumerate(result.get("gates") or []):
        _check(gate, {"name": (str,), "passed": (bool,)}, f"result.gates[{i}]")
    baseline = result.get("baseline")
    if baseline is not None:
        _check(baseline, {"run_id": (str,), "flips": (list,)}, "result.baseline")
        for i, flip in enumerate(baseline["flips"]):
            fields = {"cell": (str,), "test": (str,), "was": (bool,), "now": (bool,)}
            _check(flip, fields, f"result.baseline.flips[{i}]")


# -- tables ---------------------------------------------------------------------------------


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    cls: str = "",
    attrs: Sequence[str] | None = None,
) -> str:
    """`rows` (and each row's `attrs`) hold HTML that the caller has escaped already."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    tags = attrs or [""] * len(rows)
    body = "".join(
        f"<tr{a}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
        for a, r in zip(tags, rows, strict=True)
    )
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(ok: bool) -> str:
    return '<span class="pass">pass</span>' if ok else '<span class="fail">fail</span>'


def _config(config: dict) -> str:
    return esc(", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in config.items()) or "—")


def _cells_table(cells: Sequence[dict]) -> str:
    if not cells:
        return '<p class="muted">No cells: the run evaluated no configuration.</p>'
    headers = [
        "#",
        "cell",
        "provider",
        "config",
        "passed",
        "pass rate",
        "Wilson 95%",
        "pass^k",
        "prompt tok",
        "completion tok",
        "cost",
        "p50",
        "p95",
    ]
    rows = []
    for n, c in enumerate(cells, 1):
        lo, hi = (list(c["wilson"]) + [None, None])[:2]
        pass_k = f"{fmt_rate(c.get('pass_k'))} (k={c['k']})" if c.get("pass_k") is not None else "—"
        if c.get("pass_k") is not None and c.get("pass_k_wilson"):  # pass^k's own interval
            klo, khi = c["pass_k_wilson"]
            pass_k = f"{fmt_rate(c['pass_k'])} ({fmt_rate(klo)} – {fmt_rate(khi)}; k={c['k']})"
        rows.append(
            [
                str(n),
                esc(c["label"]),
                esc(c["provider"]),
                _config(c["config"]),
                f"{c['passed']}/{c['total']}",
                fmt_rate(c["pass_rate"]),
                f"{fmt_rate(lo)} – {fmt_rate(hi)}",
                esc(pass_k),
                fmt_int(c["prompt_tokens"]),
                fmt_int(c["completion_tokens"]),
                fmt_cost(c["cost"]),
                fmt_seconds(c["latency_p50"]),
                fmt_seconds(c["latency_p95"]),
            ]
        )
    return _table(headers, rows, "cells")


def _gates_table(gates: Sequence[dict]) -> str:
    if not gates:
        return '<p class="muted">No gates were set for this run.</p>'
    rows = [[esc(g["name"]), _verdict(g["passed"]), esc(g.get("detail", ""))] for g in gates]
    return _table(["gate", "verdict", "detail"], rows, "gates")


def _flips_section(baseline: dict | None, labels: dict[str, str]) -> str:
    if baseline is None:
        return (
            '<p class="muted">No baseline: run with <code>--baseline last</code> to list flips.</p>'
        )
    flips = baseline["flips"]
    worse = sum(1 for f in flips if f["was"] and not f["now"])
    head = (
        f"<p>Against run <code>{esc(baseline['run_id'])}</code>: {len(flips)} flips "
        f"({worse} regressions, {len(flips) - worse} fixed).</p>"
    )
    if not flips:
        return head
    rows = [
        [
            esc(labels.get(f["cell"], f["cell"])),
            esc(f["test"]),
            _verdict(f["was"]),
            _verdict(f["now"]),
            "regression"
            if f["was"] and not f["now"]
            else ("fixed" if f["now"] and not f["was"] else "same"),
        ]
        for f in flips
    ]
    return head + _table(["cell", "test", "was", "now", "change"], rows, "flips")


def _output(text: str) -> str:
    if len(text) <= OUTPUT_PREVIEW:
        return f'<pre class="out">{esc(text)}</pre>'
    return (
        f'<details><summary><pre class="out">{esc(text[:OUTPUT_PREVIEW])}…</pre>'
        f'</summary><pre class="out">{esc(text)}</pre></details>'
    )


CASE_HEADERS = ["cell", "test", "description", "repeat", "verdict", "score", "latency", "tokens",
                "cost", "output", "assertions"]  # fmt: skip


def _case_row(c: dict, labels: dict[str, str]) -> list[str]:
    checks = "<br>".join(
        f"{_verdict(a.get('passed', False))} {esc(a.get('type', '?'))}"
        + (f" ({a['score']:.2f})" if finite(a.get("score")) else "")
        + (f": {esc(short(str(a.get('reason') or ''), 200))}" if a.get("reason") else "")
        for a in c["assertions"]
    )
    score = f"{c['score']:.2f}" if finite(c["score"]) else "n/a"
    cell = esc(labels.get(c["cell"], c["cell"]))
    return [cell, esc(c["test"]), esc(c.get("description", "")), esc(c.get("repeat", 0)),
            _verdict(c["passed"]), score, fmt_seconds(c["latency_s"]), fmt_int(c.get("tokens")),
            fmt_cost(c.get("cost")), _output(c["output"] or ""), checks]  # fmt: skip


def _cases_tables(cases: Sequence[dict], labels: dict[str, str]) -> str:
    """Failed cases first and open; passed ones folded (a closed <details> is not laid out,
    which keeps a 6,000-case report quick to open)."""
    if not cases:
        return '<p class="muted">No cases.</p>'
    parts = []
    for passed in (False, True):
        mine = [c for c in cases if c["passed"] is passed]
        rows = [_case_row(c, labels) for c in mine]
        attrs = [f' data-cell="{esc(c["cell"])}" data-test="{esc(c["test"])}" '
                 f'data-repeat="{esc(c.get("repeat", 0))}"' for c in mine]  # fmt: skip
        cls = "cases passed" if passed else "cases failed"
        table = _table(CASE_HEADERS, rows, cls, attrs) if mine else ""
        if passed:
            parts.append(f'<details class="section"><summary>{len(mine)} passed cases</summary>'
                         f"{table}</details>")  # fmt: skip
        else:
            parts.append(f"<p>{len(mine)} failed cases</p>{table}")
    return "".join(parts)


def _json_safe(x: Any) -> Any:
    """NaN and infinities become null, so the data block stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _data_block(result: dict) -> str:
    """The run as JSON for tools (a data block: never executed; `<`, `>`, `&` are escaped so
    model output cannot close the element)."""
    raw = json.dumps(_json_safe(result), default=str)
    raw = raw.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="eval-result">{raw}</script>'


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232a;background:#fff;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #d5d9de;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f5f7}td{font-variant-numeric:tabular-nums}
.pass{color:#17692e;font-weight:600}.fail{color:#b3261e;font-weight:600}.muted{color:#6b737c}
pre.out{margin:0;white-space:pre-wrap;word-break:break-word;max-width:520px;font-size:12px}
details summary{cursor:pointer;list-style:none}
details.section>summary{list-style:revert;font-weight:600;margin:6px 0}
svg text{font:12px system-ui,sans-serif;fill:#1d232a}svg text.axis,svg text.muted{fill:#6b737c}
.grid{stroke:#e4e7ea}.axisline{stroke:#9aa1a8}.bar{fill:#4c7bd9}.whisker{stroke:#1d232a;stroke-width:1.5}
.pt{fill:#fff;stroke:#4c7bd9;stroke-width:2}.front-pt{fill:#d9534c;stroke:#d9534c}
.front{fill:none;stroke:#d9534c;stroke-dasharray:4 3;stroke-width:1.5}
.summary span{margin-right:18px}
"""


def render_html(result: dict) -> str:
    """The report of one run (the result JSON of `llmos eval`) as one self-contained page."""
    _validate(result)
    suite, cells = result["suite"], result["cells"]
    cases, gates = result.get("cases") or [], result.get("gates") or []
    labels = {c["id"]: c["label"] for c in cells}
    started = result.get("started_at")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if finite(started) else "n/a"
    )
    gates_ok = all(g["passed"] for g in gates)
    pareto_svg, front = pareto_chart(cells)
    latency_svg, bins = latency_chart(cases)
    bin_rows = [[f"{fmt_seconds(lo)} – {fmt_seconds(hi)}", str(n)] for lo, hi, n in bins]
    gate_word = "no gates" if not gates else ("all gates hold" if gates_ok else "a gate failed")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>llmos eval: {esc(suite['name'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>llmos eval: {esc(suite['name'])}</h1>",
        '<p class="summary">'
        f"<span>run <code>{esc(result['run_id'])}</code></span>"
        f"<span>suite <code>{esc(suite.get('path', ''))}</code></span>"
        f"<span>hash <code>{esc(short(str(suite.get('hash', '')), 16))}</code></span>"
        f"<span>started {esc(when)}</span>"
        f"<span>took {fmt_seconds(result.get('duration_s'))}</span>"
        f"<span>{len(cells)} cells, {len(cases)} cases</span>"
        f'<span class="{"pass" if gates_ok else "fail"}">{gate_word}</span></p>',
        "<h2>Gates</h2>",
        _gates_table(gates),
        "<h2>Cells</h2>",
        _cells_table(cells),
        "<h2>Accuracy by cell</h2>",
        accuracy_chart(cells),
        "<h2>Cost against accuracy</h2>",
        pareto_svg,
        f"<p>Pareto front (filled points): {esc(front) or '—'}</p>",
        "<h2>Latency</h2>",
        latency_svg,
        _table(["latency", "cases"], bin_rows, "latency") if bin_rows else "",
        "<h2>Flips against the baseline</h2>",
        _flips_section(result.get("baseline"), labels),
        '<h2>Cases</h2><div id="cases">',
        _cases_tables(cases, labels),
        "</div>",
        _data_block(result),
        "</body></html>",
    ]
    return "\n".join(parts)
