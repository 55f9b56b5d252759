"""CI gates over a result: a pass rate, pass^k (per cell and per test), a maximum cost or
latency. `llmos eval` exits 0 when every gate holds, 1 when one fails (naming it), and 2 on a
configuration error."""

from __future__ import annotations

from typing import Any

from llmos.evals.runner import pass_hat_k

EXIT_OK, EXIT_GATE, EXIT_CONFIG = 0, 1, 2


def check(result: dict[str, Any], gates: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per gate and cell: {name, passed, detail}."""
    out: list[dict[str, Any]] = []
    k = int(result.get("repeat", 1))

    def add(name: str, ok: bool, detail: str) -> None:
        out.append({"name": name, "passed": bool(ok), "detail": detail})

    for cell in result["cells"]:
        where = f"[{cell['label']}]"
        if "pass_rate" in gates:
            want = float(gates["pass_rate"])
            rate = f"{cell['passed']}/{cell['total']} = {cell['pass_rate']:.1%}"
            add(f"pass_rate {where}", cell["pass_rate"] >= want, f"{rate} (need {want:.1%})")
        if "pass_k" in gates:
            want = float(gates["pass_k"])
            got = cell["pass_k"] if cell["pass_k"] is not None else cell["pass_rate"]
            add(f"pass_k {where}", got >= want, f"pass^{k} = {got:.1%} (need {want:.1%})")
        if "max_cost" in gates:
            want = float(gates["max_cost"])
            add(
                f"max_cost {where}",
                cell["cost"] <= want,
                f"${cell['cost']:.6f} (at most ${want:g})",
            )  # noqa: E501
        for q in ("p50", "p95"):
            if f"max_latency_{q}" in gates:
                want, got = float(gates[f"max_latency_{q}"]), cell[f"latency_{q}"]
                add(f"max_latency_{q} {where}", got <= want, f"{got:.2f} s (at most {want:g} s)")
        for test, want in (gates.get("test_pass_k") or {}).items():
            marks = [
                c["passed"]
                for c in result["cases"]
                if c["cell"] == cell["id"] and c["test"] == test
            ]  # noqa: E501
            if not marks:
                add(f"test_pass_k {test} {where}", False, f"no test {test!r} in the suite")
                continue
            got = pass_hat_k(sum(marks), len(marks), len(marks))
            add(
                f"test_pass_k {test} {where}",
                got >= float(want),
                f"{sum(marks)}/{len(marks)} repeats passed: pass^{len(marks)} = {got:.0%} "
                f"(need {float(want):.0%})",
            )
    return out


def exit_code(gates: list[dict[str, Any]]) -> int:
    return EXIT_OK if all(g["passed"] for g in gates) else EXIT_GATE
