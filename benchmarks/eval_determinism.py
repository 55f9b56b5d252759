"""Determinism as a feature of evals: N reruns of the 200-case greedy suite (evals/greedy.yaml)
in deterministic and in default mode, counting the tests whose verdict flipped and the tests
whose text changed at all.

    .venv/bin/python benchmarks/eval_determinism.py [--repeat 20] [--max-tokens N]
        [--modes deterministic,default] [--out DIR]

Each mode runs `llmos eval`'s own runner (`run_suite`) on the suite's cell for that mode with
`--repeat N`: every repeat of every case is in flight at once on one engine, so each repeat
runs in a different batch beside different requests. `--max-tokens` shortens the cases when
the machine is too loaded for the suite's own length. Each mode's summary and texts are written
to DIR/<mode>.json as soon as it finishes, so a long run keeps what it finished. It prints,
per mode: correct cases per repeat, flipped tests, changed texts, time; and how many texts the
two modes share."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_mode(suite: Any, mode: str, repeat: int, max_tokens: int | None) -> dict[str, Any]:
    from llmos.evals.runner import run_suite

    cells = [c for c in suite.cells if bool(c.engine.get("deterministic")) == (mode != "default")]
    assert len(cells) == 1, f"the suite has no single {mode} cell"
    cell = cells[0]
    if max_tokens is not None:
        cell = dataclasses.replace(cell, sampling={**cell.sampling, "max_tokens": max_tokens})
    t0 = time.perf_counter()
    result = run_suite(dataclasses.replace(suite, cells=[cell]), repeat=repeat, progress=print)
    seconds = time.perf_counter() - t0
    verdicts: dict[str, set[bool]] = {}
    texts: dict[str, set[str]] = {}
    for c in result["cases"]:
        verdicts.setdefault(c["test"], set()).add(c["passed"])
        texts.setdefault(c["test"], set()).add(c["output"])
    per_repeat = [
        sum(c["passed"] for c in result["cases"] if c["repeat"] == r) for r in range(repeat)
    ]
    summary = result["cells"][0]
    return {
        "mode": mode, "repeat": repeat, "tests": len(verdicts), "requests": len(result["cases"]),
        "max_tokens": cell.sampling.get("max_tokens"), "correct_per_repeat": per_repeat,
        "flipped_tests": sum(len(v) > 1 for v in verdicts.values()),
        "changed_texts": sum(len(v) > 1 for v in texts.values()),
        "seconds": seconds, "load_avg": os.getloadavg(),
        "latency_p50": summary["latency_p50"], "latency_p95": summary["latency_p95"],
        "kv_blocks_left": [e["kv_blocks_used"] for e in result["engines"]],
        "texts": {t: sorted(v) for t, v in texts.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", type=Path, default=ROOT / "evals" / "greedy.yaml")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--modes", default="deterministic,default")
    parser.add_argument("--out", type=Path, default=Path("eval-determinism"))
    args = parser.parse_args()
    from llmos.evals.suite import load_suite

    suite = load_suite(args.suite)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    for mode in args.modes.split(","):
        r = run_mode(suite, mode, args.repeat, args.max_tokens)
        r["commit"] = commit or "(not a git checkout)"
        (args.out / f"{mode}.json").write_text(json.dumps(r, indent=1))
        done[mode] = r
        print(
            f"{mode}: {r['tests']} tests x {r['repeat']} repeats ({r['requests']} requests, "
            f"max_tokens {r['max_tokens']}): correct {sorted(set(r['correct_per_repeat']))}, "
            f"flipped tests {r['flipped_tests']}, changed texts {r['changed_texts']}, "
            f"{r['seconds']:.0f} s, load {r['load_avg'][0]:.1f}",
            flush=True,
        )  # noqa: E501
    if len(done) == 2:
        a, b = (done[m]["texts"] for m in done)
        same = sum(a[t] == b[t] for t in a)
        print(f"the two modes gave the same text(s) for {same}/{len(a)} tests")


if __name__ == "__main__":
    main()
