"""Writes evals/agent_cases.jsonl: tasks from benchmarks/agent_tasks.py (the small-agents
suite: workspace files, a question, the regex a right answer matches and the one it must not)
as promptfoo-style test cases for evals/agent.yaml.

    .venv/bin/python evals/make_cases.py [--tasks 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def case(task) -> dict:  # noqa: ANN001 - a benchmarks.agent_tasks.Task
    flags = "" if task.answer.startswith("(?") else "(?i)"
    asserts = [{"type": "regex", "value": flags + task.answer}]
    if task.wrong:
        asserts.append({"type": "not-regex", "value": "(?i)" + task.wrong})
    return {
        "id": task.name,
        "description": f"{task.kind}: {task.question}",
        "vars": {"question": task.question, "expected": task.expected},
        "files": task.files,
        "assert": asserts,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.agent_tasks import make_tasks

    lines = [json.dumps(case(t)) for t in make_tasks(args.tasks, args.seed)]
    (HERE / "agent_cases.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} cases to {HERE / 'agent_cases.jsonl'}")


if __name__ == "__main__":
    main()
