"""A self-contained HTML report of one `llmos eval` run.

`render_html(result)` reads the result JSON that `llmos eval` writes and returns one page:
no network, no scripts, no external CSS. The plots are inline SVG drawn here (accuracy by cell
with Wilson intervals, cost against accuracy with its Pareto front, a latency histogram), and
every number in them is also in a table, so the page reads without the pictures. Model output
is untrusted text: everything is escaped, and a Content-Security-Policy forbids scripts and
network loads outright, so a slip in escaping shows up as a console error, not a running script.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["render_html"]

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
OUTPUT_PREVIEW = 160  # characters of a case's output shown before the <details> fold
WIDTH = 760

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
_NULLABLE = {"pass_k", "pass_rate", "cost", "latency_p50", "latency_p95", "score", "latency_s"}


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


# -- number formats (the test reads the page through these) --------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def fmt_rate(x: Any) -> str:
    return f"{x * 100:.1f}%" if _finite(x) else "n/a"


def fmt_cost(x: Any) -> str:
    return f"${x:.6f}" if _finite(x) else "n/a"


def fmt_seconds(x: Any) -> str:
    return f"{x:.3f} s" if _finite(x) else "n/a"


def fmt_int(x: Any) -> str:
    return f"{x:,}" if _finite(x) else "n/a"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# -- SVG charts -----------------------------------------------------------------------------


def _svg(height: float, body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{WIDTH}" '
        f'height="{height:.0f}" viewBox="0 0 {WIDTH} {height:.0f}" aria-label="{_e(title)}">'
        f"<title>{_e(title)}</title>{''.join(body)}</svg>"
    )


def _text(x: float, y: float, s: str, anchor: str = "start", cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{c}>{_e(s)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, cls: str) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" class="{cls}"/>'


def _rect(x: float, y: float, w: float, h: float, cls: str) -> str:
    return f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" class="{cls}"/>'


def _empty_chart(message: str) -> str:
    return _svg(60, [_text(WIDTH / 2, 35, message, "middle", "muted")], message)


def accuracy_chart(cells: Sequence[dict]) -> str:
    """Horizontal bars (one per cell, so 30 cells stay legible) with Wilson whiskers."""
    if not cells:
        return _empty_chart("no cells in this run")
    left, right, row, top = 230, 70, 24, 28
    plot_w = WIDTH - left - right
    height = top + row * len(cells) + 30
    body = []
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * plot_w
        body.append(_line(x, top - 6, x, height - 26, "grid"))
        body.append(_text(x, top - 10, fmt_rate(t), "middle", "axis"))
    for i, cell in enumerate(cells):
        y = top + i * row
        rate = cell["pass_rate"] if _finite(cell["pass_rate"]) else 0.0
        tip = f"{cell['label']}: {fmt_rate(cell['pass_rate'])} ({cell['passed']}/{cell['total']})"
        body.append(f"<g><title>{_e(tip)}</title>")
        body.append(_text(left - 8, y + 16, _short(f"{i + 1}. {cell['label']}", 32), "end"))
        w = max(0.0, min(1.0, rate)) * plot_w
        body.append(_rect(left, y + 4, w, row - 8, "bar"))
        lo, hi = (list(cell["wilson"]) + [None, None])[:2]
        if _finite(lo) and _finite(hi):
            x1, x2 = left + lo * plot_w, left + hi * plot_w
            ym = y + row / 2
            body.append(_line(x1, ym, x2, ym, "whisker"))
            for x in (x1, x2):
                body.append(_line(x, ym - 5, x, ym + 5, "whisker"))
        body.append(_text(left + plot_w + 6, y + 16, fmt_rate(cell["pass_rate"])))
        body.append("</g>")
    body.append(
        _text(
            left + plot_w / 2, height - 8, "pass rate (bar) and Wilson interval", "middle", "axis"
        )
    )
    return _svg(height, body, "Accuracy by cell")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (cost no higher and accuracy no lower, one
    of them strictly), sorted by cost."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _ticks(
    lo: float, hi: float, fmt: Callable[[float], str], n: int = 5
) -> list[tuple[float, str]]:
    return [(lo + (hi - lo) * j / (n - 1), fmt(lo + (hi - lo) * j / (n - 1))) for j in range(n)]


def pareto_chart(cells: Sequence[dict]) -> tuple[str, str]:
    """Cost (x) against accuracy (y); the front is joined by a step line. Where every cell cost
    nothing (local models), x falls back to tokens, and the chart says so."""
    usable = [c for c in cells if _finite(c["pass_rate"])]
    if not usable:
        return _empty_chart("no cells to compare"), ""
    costs = [c["cost"] if _finite(c["cost"]) else 0.0 for c in usable]
    if any(costs):
        xs, xname, xfmt = costs, "cost", fmt_cost
    else:
        xs = [float(c["prompt_tokens"] + c["completion_tokens"]) for c in usable]
        xname = "tokens (every cell cost $0)"
        xfmt = lambda v: fmt_int(round(v))  # noqa: E731
    left, right, top, bottom, height = 80, 30, 20, 50, 360
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1 if x_lo >= 1 else 0.0, x_hi + 1
    px = lambda v: left + (v - x_lo) / (x_hi - x_lo) * plot_w  # noqa: E731
    py = lambda a: top + (1 - max(0.0, min(1.0, a))) * plot_h  # noqa: E731
    body = []
    for v, label in _ticks(x_lo, x_hi, xfmt):
        body.append(_line(px(v), top, px(v), top + plot_h, "grid"))
        body.append(_text(px(v), top + plot_h + 16, label, "middle", "axis"))
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        body.append(_line(left, py(a), left + plot_w, py(a), "grid"))
        body.append(_text(left - 6, py(a) + 4, fmt_rate(a), "end", "axis"))
    body.append(_text(left + plot_w / 2, height - 10, xname, "middle", "axis"))
    points = [(x, c["pass_rate"]) for x, c in zip(xs, usable, strict=True)]
    front = pareto_front(points)
    if len(front) > 1:
        path = [f"M{px(points[front[0]][0]):.1f},{py(points[front[0]][1]):.1f}"]
        for i in front[1:]:
            path.append(f"H{px(points[i][0]):.1f}")
            path.append(f"V{py(points[i][1]):.1f}")
        body.append(f'<path d="{" ".join(path)}" class="front"/>')
    index = {c["id"]: n for n, c in enumerate(cells, 1)}
    for i, (c, (x, a)) in enumerate(zip(usable, points, strict=True)):
        cls = "pt front-pt" if i in front else "pt"
        tip = f"{index[c['id']]}. {c['label']}: {fmt_rate(a)}, {xname.split(' ')[0]} {xfmt(x)}"
        body.append(f"<g><title>{_e(tip)}</title>")
        body.append(f'<circle cx="{px(x):.1f}" cy="{py(a):.1f}" r="5" class="{cls}"/>')
        body.append(_text(px(x) + 7, py(a) - 6, str(index[c["id"]]), "start", "axis"))
        body.append("</g>")
    names = ", ".join(f"{index[usable[i]['id']]}. {usable[i]['label']}" for i in front)
    return _svg(height, body, "Cost against accuracy"), names


def histogram(values: Sequence[float], bins: int | None = None) -> list[tuple[float, float, int]]:
    """Equal-width bins over [min, max]: (low, high, count); the last bin includes max."""
    vals = [v for v in values if _finite(v)]
    if not vals:
        return []
    lo, hi = min(vals), max(vals)
    n = bins or max(1, min(20, round(math.sqrt(len(vals)))))
    if hi == lo:
        return [(lo, hi, len(vals))]
    width = (hi - lo) / n
    counts = [0] * n
    for v in vals:
        counts[min(n - 1, int((v - lo) / width))] += 1
    return [(lo + j * width, lo + (j + 1) * width, counts[j]) for j in range(n)]


def latency_chart(cases: Sequence[dict]) -> tuple[str, list[tuple[float, float, int]]]:
    bins = histogram([c["latency_s"] for c in cases])
    if not bins:
        return _empty_chart("no case latencies in this run"), bins
    left, right, top, bottom, height = 60, 30, 20, 50, 260
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    peak = max(b[2] for b in bins)
    bw = plot_w / len(bins)
    body = []
    for j, (lo, hi, count) in enumerate(bins):
        h = count / peak * plot_h
        x = left + j * bw
        tip = f"{fmt_seconds(lo)} to {fmt_seconds(hi)}: {count} cases"
        body.append(f"<g><title>{_e(tip)}</title>")
        body.append(_rect(x + 1, top + plot_h - h, bw - 2, h, "bar"))
        if count:
            body.append(_text(x + bw / 2, top + plot_h - h - 4, str(count), "middle", "axis"))
        body.append("</g>")
    edges = [bins[0][0]] + [b[1] for b in bins]
    step = max(1, len(edges) // 6)
    for j in list(range(0, len(edges), step)) + (
        [len(edges) - 1] if (len(edges) - 1) % step else []
    ):
        body.append(
            _text(left + j * bw, top + plot_h + 16, fmt_seconds(edges[j]), "middle", "axis")
        )
    body.append(_line(left, top + plot_h, left + plot_w, top + plot_h, "axisline"))
    body.append(_text(left + plot_w / 2, height - 10, "case latency (all cells)", "middle", "axis"))
    return _svg(height, body, "Latency histogram"), bins


# -- tables ---------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """`rows` hold HTML that the caller has escaped already."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(ok: bool) -> str:
    return '<span class="pass">pass</span>' if ok else '<span class="fail">fail</span>'


def _config(config: dict) -> str:
    return _e(", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in config.items()) or "—")


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
        rows.append(
            [
                str(n),
                _e(c["label"]),
                _e(c["provider"]),
                _config(c["config"]),
                f"{c['passed']}/{c['total']}",
                fmt_rate(c["pass_rate"]),
                f"{fmt_rate(lo)} – {fmt_rate(hi)}",
                _e(pass_k),
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
    rows = [[_e(g["name"]), _verdict(g["passed"]), _e(g.get("detail", ""))] for g in gates]
    return _table(["gate", "verdict", "detail"], rows, "gates")


def _flips_section(baseline: dict | None, labels: dict[str, str]) -> str:
    if baseline is None:
        return (
            '<p class="muted">No baseline: run with <code>--baseline last</code> to list flips.</p>'
        )
    flips = baseline["flips"]
    worse = sum(1 for f in flips if f["was"] and not f["now"])
    head = (
        f"<p>Against run <code>{_e(baseline['run_id'])}</code>: {len(flips)} flips "
        f"({worse} regressions, {len(flips) - worse} fixed).</p>"
    )
    if not flips:
        return head
    rows = [
        [
            _e(labels.get(f["cell"], f["cell"])),
            _e(f["test"]),
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
        return f'<pre class="out">{_e(text)}</pre>'
    return (
        f'<details><summary><pre class="out">{_e(text[:OUTPUT_PREVIEW])}…</pre>'
        f'</summary><pre class="out">{_e(text)}</pre></details>'
    )


def _cases_table(cases: Sequence[dict], labels: dict[str, str]) -> str:
    if not cases:
        return '<p class="muted">No cases.</p>'
    rows = []
    for c in cases:
        checks = "<br>".join(
            f"{_verdict(a.get('passed', False))} {_e(a.get('type', '?'))}"
            + (f" ({a['score']:.2f})" if _finite(a.get("score")) else "")
            + (f": {_e(_short(str(a.get('reason') or ''), 200))}" if a.get("reason") else "")
            for a in c["assertions"]
        )
        score = f"{c['score']:.2f}" if _finite(c["score"]) else "n/a"
        rows.append(
            [
                _e(labels.get(c["cell"], c["cell"])),
                _e(c["test"]),
                _e(c.get("description", "")),
                str(c.get("repeat", 0)),
                _verdict(c["passed"]),
                score,
                fmt_seconds(c["latency_s"]),
                fmt_int(c.get("tokens")),
                fmt_cost(c.get("cost")),
                _output(c["output"]),
                checks,
            ]
        )
    headers = [
        "cell",
        "test",
        "description",
        "repeat",
        "verdict",
        "score",
        "latency",
        "tokens",
        "cost",
        "output",
        "assertions",
    ]
    return _table(headers, rows, "cases")


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
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if _finite(started) else "n/a"
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
        f"<title>llmos eval: {_e(suite['name'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>llmos eval: {_e(suite['name'])}</h1>",
        '<p class="summary">'
        f"<span>run <code>{_e(result['run_id'])}</code></span>"
        f"<span>suite <code>{_e(suite.get('path', ''))}</code></span>"
        f"<span>hash <code>{_e(_short(str(suite.get('hash', '')), 16))}</code></span>"
        f"<span>started {_e(when)}</span>"
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
        f"<p>Pareto front (filled points): {_e(front) or '—'}</p>",
        "<h2>Latency</h2>",
        latency_svg,
        _table(["latency", "cases"], bin_rows, "latency") if bin_rows else "",
        "<h2>Flips against the baseline</h2>",
        _flips_section(result.get("baseline"), labels),
        "<h2>Cases</h2>",
        _cases_table(cases, labels),
        _data_block(result),
        "</body></html>",
    ]
    return "\n".join(parts)
