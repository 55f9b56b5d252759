"""Writes evals/agent_cases.jsonl: tasks from benchmarks/agent_tasks.py (the small-agents
suite: workspace files, a question, the regex a right answer matches and the one it must not)
as promptfoo-style test cases for evals/agent.yaml.

    .venv/bin/python evals/make_cases.py [--tasks 6] [--seed 0] [--out agent_cases.jsonl]
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
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="agent_cases.jsonl", help="a file name in evals/")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.agent_tasks import make_tasks

    lines = [json.dumps(case(t)) for t in make_tasks(args.tasks, args.seed)]
    (HERE / args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} cases to {HERE / args.out}")


if __name__ == "__main__":
    main()
