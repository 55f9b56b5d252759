"""SVG charts of an eval run, drawn as strings (no plotting library, no scripts), and the
number formats that the report prints in its charts and tables alike.

Each chart is an `<svg>` with an `aria-label`, a `<title>` per mark, and classes that the
report's stylesheet colours; every number drawn is also printed in a table by `html.py`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

WIDTH = 760

# -- number formats (shared by the charts and the tables) --------------------------------


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def fmt_rate(x: Any) -> str:
    return f"{x * 100:.1f}%" if finite(x) else "n/a"


def fmt_cost(x: Any) -> str:
    return f"${x:.6f}" if finite(x) else "n/a"


def fmt_seconds(x: Any) -> str:
    return f"{x:.3f} s" if finite(x) else "n/a"


def fmt_int(x: Any) -> str:
    return f"{x:,}" if finite(x) else "n/a"


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# -- SVG charts -----------------------------------------------------------------------------


def _svg(height: float, body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{WIDTH}" '
        f'height="{height:.0f}" viewBox="0 0 {WIDTH} {height:.0f}" aria-label="{esc(title)}">'
        f"<title>{esc(title)}</title>{''.join(body)}</svg>"
    )


def _text(x: float, y: float, s: str, anchor: str = "start", cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{c}>{esc(s)}</text>'


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
        rate = cell["pass_rate"] if finite(cell["pass_rate"]) else 0.0
        tip = f"{cell['label']}: {fmt_rate(cell['pass_rate'])} ({cell['passed']}/{cell['total']})"
        body.append(f"<g><title>{esc(tip)}</title>")
        body.append(_text(left - 8, y + 16, short(f"{i + 1}. {cell['label']}", 32), "end"))
        w = max(0.0, min(1.0, rate)) * plot_w
        body.append(_rect(left, y + 4, w, row - 8, "bar"))
        lo, hi = (list(cell["wilson"]) + [None, None])[:2]
        if finite(lo) and finite(hi):
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
    usable = [c for c in cells if finite(c["pass_rate"])]
    if not usable:
        return _empty_chart("no cells to compare"), ""
    costs = [c["cost"] if finite(c["cost"]) else 0.0 for c in usable]
    if any(costs):
        xs, xname, xfmt = costs, "cost", fmt_cost
    else:
        xs = [float(c["prompt_tokens"] + c["completion_tokens"]) for c in usable]
        xname = "tokens (every cell cost $0)"
        xfmt = lambda v: fmt_int(round(v))  # noqa: E731
    left, right, top, bottom, height = 80, 56, 20, 50, 360
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    # a margin, so that no point sits on the frame; one x value gets a range around it
    x_lo, x_hi = min(xs), max(xs)
    pad = (x_hi - x_lo) * 0.06 if x_hi > x_lo else (abs(x_hi) or 1.0) / 2
    x_lo, x_hi = x_lo - pad, x_hi + pad
    if min(xs) >= 0:
        x_lo = max(0.0, x_lo)
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
        body.append(f"<g><title>{esc(tip)}</title>")
        body.append(f'<circle cx="{px(x):.1f}" cy="{py(a):.1f}" r="5" class="{cls}"/>')
        body.append(_text(px(x) + 7, py(a) - 6, str(index[c["id"]]), "start", "axis"))
        body.append("</g>")
    names = ", ".join(f"{index[usable[i]['id']]}. {usable[i]['label']}" for i in front)
    return _svg(height, body, "Cost against accuracy"), names


def histogram(values: Sequence[float], bins: int | None = None) -> list[tuple[float, float, int]]:
    """Equal-width bins over [min, max]: (low, high, count); the last bin includes max."""
    vals = [v for v in values if finite(v)]
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
        body.append(f"<g><title>{esc(tip)}</title>")
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
