"""Writes evals/greedy_cases.jsonl: 200 short greedy cases (sums of two small numbers, the
number checked with `numeric`) for evals/greedy.yaml, the determinism check.

    .venv/bin/python evals/make_greedy.py [--cases 200]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMS = [
    "What is {a} plus {b}? Answer with the number only.",
    "Compute {a} + {b}.",
    "Add {a} and {b}. What do you get?",
    "If you have {a} apples and get {b} more, how many apples do you have?",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(0)
    lines = []
    for i in range(args.cases):
        a, b = rng.randint(1, 60), rng.randint(1, 40)
        q = FORMS[i % len(FORMS)].format(a=a, b=b)
        lines.append(json.dumps({
            "id": f"sum-{i}", "vars": {"q": q},
            "assert": [{"type": "numeric", "value": a + b}],
        }))  # fmt: skip
    (HERE / "greedy_cases.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} cases")


if __name__ == "__main__":
    main()
