"""The give-up report: written for every stop other than success, so a person can pick up
where the process left off. It says what the goal was, what was tried, what failed and why,
and what is left to do."""

from __future__ import annotations

from typing import Any

from llmos.kernel.process import ErrorStep, ModelTurn, Process, ToolResultStep

ADVICE = {
    "step_limit": "Raise limits.max_steps, or split the task into smaller ones.",
    "time_limit": "Raise limits.max_seconds, or check which call was slow (see the steps).",
    "budget": "Raise the budget that ran out (limits.max_tokens / max_cost, or the user's "
    "budget with `llmos usage --user U --max-cost ...`), or narrow the task.",
    "stuck": "The model repeated the same call without progress: read its result above, "
    "reword the task or the system prompt, or finish the step by hand.",
    "malformed": "The model could not produce a usable reply even after a repair request: "
    "try a larger model, constrained tool calls, or a simpler output schema.",
    "backend": "The model backend failed: check that it is reachable, then `llmos resume PID`.",
    "killed": "A person stopped the process. Nothing more runs; start it again if needed.",
    "internal": "llmos itself failed (a bug; the traceback is in the kernel's log): report it, "
    "then `llmos resume PID`.",
}


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def build(proc: Process, kind: str, reason: str) -> dict[str, Any]:
    calls = {c.id: c for s in proc.steps if isinstance(s, ModelTurn) for c in s.tool_calls}
    tried: list[str] = []
    failed: list[str] = []
    for s in proc.steps:
        if isinstance(s, ToolResultStep):
            c = calls.get(s.call_id)
            args = _short(c.arguments, 80) if c else "?"
            outcome = "ok: " + _short(s.output, 80) if s.ok else "failed: " + _short(s.error or "")
            tried.append(f"{s.name}({args}) → {outcome}")
            if not s.ok:
                failed.append(f"{s.name}({args}): {s.error}")
        elif isinstance(s, ErrorStep) and s.what in ("malformed_output", "bad_answer"):
            failed.append(f"model output unusable: {s.message}")
    last_text = next(
        (
            s.content or s.raw
            for s in reversed(proc.steps)
            if isinstance(s, ModelTurn) and not s.tool_calls and (s.content or s.raw)
        ),
        None,
    )
    left = ADVICE.get(kind, "Read the steps below and decide how to continue.")
    if failed:
        left += f" The last failure was: {failed[-1]}"
    return {
        "goal": proc.input,
        "program": f"{proc.program.name}@{proc.program.version}",
        "stopped_because": reason,
        "kind": kind,
        "turns": proc.num_turns,
        "steps_tried": tried,
        "what_failed": failed + [reason],
        "left_for_a_person": left,
        "last_model_text": _short(last_text, 400) if last_text else None,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Give-up report ({report['kind']})",
        f"  goal: {report['goal']}",
        f"  program: {report['program']}, {report['turns']} model turns",
        f"  stopped because: {report['stopped_because']}",
        "  steps tried:",
    ]
    lines += [f"    {i}. {t}" for i, t in enumerate(report["steps_tried"], 1)] or ["    (none)"]
    lines.append("  what failed:")
    lines += [f"    - {f}" for f in report["what_failed"]]
    lines.append(f"  left for a person: {report['left_for_a_person']}")
    if report.get("last_model_text"):
        lines.append(f"  the model last said: {report['last_model_text']}")
    return "\n".join(lines)
