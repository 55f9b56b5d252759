"""Evals as CI: suites as data (a promptfoo subset), a configuration matrix, assertions,
repeats with pass^k, gates with exit codes, history in the kernel's SQLite, and reports.

    from llmos.evals import load_suite, run_suite
    result = run_suite(load_suite("evals/agent.yaml"), repeat=3)

Uses only llmos's public API (LLM, SamplingParams, Kernel, Program, backends)."""

from __future__ import annotations

from llmos.evals.suite import Suite, SuiteError, load_suite

__all__ = ["Suite", "SuiteError", "load_suite", "run_suite"]


def run_suite(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - see runner.run_suite
    from llmos.evals.runner import run_suite as run

    return run(*args, **kwargs)
