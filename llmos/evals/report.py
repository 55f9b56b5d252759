"""Reports of a result: JSON (the shape `llmos.evals.html.render_html` reads), JUnit XML (one
testsuite per cell, one testcase per test and repeat, so CI systems list the cases) and
Markdown (a table per cell, the gates, the flips)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=str)


def to_junit(result: dict[str, Any]) -> str:
    root = ET.Element("testsuites", name=result["suite"]["name"],
                      time=f"{result['duration_s']:.3f}")  # fmt: skip
    for cell in result["cells"]:
        mine = [c for c in result["cases"] if c["cell"] == cell["id"]]
        suite = ET.SubElement(
            root, "testsuite", name=cell["label"], tests=str(len(mine)),
            failures=str(sum(not c["passed"] for c in mine)),
            time=f"{sum(c['latency_s'] for c in mine):.3f}",
        )  # fmt: skip
        for c in mine:
            name = c["test"] + (f" #{c['repeat']}" if result.get("repeat", 1) > 1 else "")
            case = ET.SubElement(suite, "testcase", classname=cell["id"], name=name,
                                 time=f"{c['latency_s']:.3f}")  # fmt: skip
            if not c["passed"]:
                failed = [a for a in c["assertions"] if not a["passed"]]
                message = "; ".join(f"{a['type']}: {a['reason']}" for a in failed) or "failed"
                node = ET.SubElement(case, "failure", message=message[:500])
                node.text = f"output: {c['output'][:2000]}"
    gates = ET.SubElement(root, "testsuite", name="gates", tests=str(len(result["gates"])),
                          failures=str(sum(not g["passed"] for g in result["gates"])))  # fmt: skip
    for g in result["gates"]:
        case = ET.SubElement(gates, "testcase", classname="gates", name=g["name"])
        if not g["passed"]:
            ET.SubElement(case, "failure", message=g["detail"])
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def _row(values: list[Any]) -> str:
    return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Eval: {result['suite']['name']}", "",
             f"run `{result['run_id']}`, suite hash `{result['suite']['hash']}`, "
             f"{len(result['cases'])} cases in {result['duration_s']:.1f} s", ""]  # fmt: skip
    head = [
        "cell",
        "passed",
        "pass rate (95% CI)",
        "pass^k (95% CI)",
        "flaky",
        "tokens",
        "cost",
        "p50 s",
        "p95 s",
    ]
    lines += [_row(head), _row(["---"] * len(head))]
    for c in result["cells"]:
        lo, hi = c["wilson"]
        pk = "" if c["pass_k"] is None else f"{c['pass_k']:.0%} (k={c['k']})"
        if c["pass_k"] is not None and c.get("pass_k_wilson"):
            klo, khi = c["pass_k_wilson"]
            pk = f"{c['pass_k']:.0%} ({klo:.0%}-{khi:.0%}; k={c['k']})"
        lines.append(_row([
            c["label"], f"{c['passed']}/{c['total']}", f"{c['pass_rate']:.0%} ({lo:.0%}-{hi:.0%})",
            pk, c.get("flaky_tests", ""), f"{c['prompt_tokens'] + c['completion_tokens']:,}",
            f"${c['cost']:.6f}",
            f"{c['latency_p50']:.2f}", f"{c['latency_p95']:.2f}",
        ]))  # fmt: skip
    if result["gates"]:
        lines += ["", "## Gates", ""]
        lines += [
            f"- {'PASS' if g['passed'] else 'FAIL'} {g['name']}: {g['detail']}"
            for g in result["gates"]
        ]  # noqa: E501
    failed = [c for c in result["cases"] if not c["passed"]]
    if failed:
        lines += [
            "",
            "## Failed cases",
            "",
            _row(["cell", "test", "repeat", "why"]),
            _row(["---"] * 4),
        ]  # noqa: E501
        for c in failed[:40]:
            why = "; ".join(a["reason"] for a in c["assertions"] if not a["passed"])
            lines.append(_row([c["cell"], c["test"], c["repeat"], why[:160]]))
        if len(failed) > 40:
            lines += ["", f"... and {len(failed) - 40} more (result.json and junit.xml list all)"]
    base = result.get("baseline")
    if base:
        lines += ["", f"## Against baseline `{base['run_id']}`: {len(base['flips'])} flips", ""]
        for f in base["flips"]:
            was, now = ("pass" if f[k] else "fail" for k in ("was", "now"))
            lines.append(f"- {f['cell']} / {f['test']}: {was} -> {now}")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path, html: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"result.json": to_json(result), "junit.xml": to_junit(result),
             "report.md": to_markdown(result)}  # fmt: skip
    if html:
        from llmos.evals.html import render_html

        files["report.html"] = render_html(result)
    paths = []
    for name, text in files.items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths
