"""What deterministic mode costs: the default and the deterministic engine on the same three
workloads, each in its own worker process, one after another, in the same run.

    .venv/bin/python benchmarks/determinism.py [--threads 2] [--reps 3] [--base REF]
                                               [--record BENCHMARKS.md]

- single-stream decode: 128 greedy tokens (EOS ignored) after a short chat prompt; tokens/s
  over tokens 2..128.
- prefill: a 512-token prompt to its first token (prefix cache cleared).
- batch 32: 32 prompts × 128 tokens at once.
- both modes' engines run in one worker process, and each workload's `reps` runs alternate
  between them; the best run counts (the machine is shared: the best run is the least
  disturbed one).
- bitwise: the batch's first prompt alone and in the batch give the same tokens and logprobs
  (deterministic mode only promises this; the default mode is checked and reported too).
- `--base REF`: deterministic mode as the llmos of git REF had it, too (its package exported
  to a temporary folder on PYTHONPATH), to record a starting point in the same run.

It prints each mode and its ratio to the default for each workload.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CORPUS,
    emit,
    loadavg,
    machine,
    md_table,
    replace_section,
    run_worker,
)

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
DECODE_TOKENS = 128
PREFILL_TOKENS = 512
BATCH = 32
SECTION = "## Determinism (benchmarks/determinism.py)"
console = Console(stderr=True)


class Bench:
    """One engine in one mode, and the three workloads on it."""

    def __init__(self, mode: str) -> None:
        from llmos import LLM

        self.llm = LLM(model=MODEL, deterministic=mode == "deterministic", kv_cache_memory="512MiB")
        tok = self.llm.tokenizer
        self.chat = tok.encode_chat(CHAT)
        ids = tok.encode(" ".join(CORPUS * 4))
        self.long = ids[:PREFILL_TOKENS]
        self.batch = [ids[i * 37 : i * 37 + 40 + (i % 5) * 20] for i in range(BATCH)]
        self.outs: list[Any] = []

    def stream(self, prompt: list[int], n: int) -> list[float]:
        from llmos import SamplingParams

        engine = self.llm.engine
        engine.blocks.reset_prefix_cache()
        engine.add_request(
            "s", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        )
        times: list[float] = []
        while engine.has_unfinished_requests():
            if engine.step():
                times.append(time.perf_counter())
        return times

    # Each returns (tokens per second of wall time, tokens per CPU second of this process).
    def decode(self) -> tuple[float, float]:
        c = time.process_time()
        times = self.stream(self.chat, DECODE_TOKENS)
        cpu = time.process_time() - c  # (its first token's prefill too: the chat prompt's few)
        return (len(times) - 1) / (times[-1] - times[0]), DECODE_TOKENS / cpu

    def prefill(self) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        self.stream(self.long, 1)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        return PREFILL_TOKENS / wall, PREFILL_TOKENS / cpu

    def batched(self) -> tuple[float, float]:
        self.llm.engine.blocks.reset_prefix_cache()
        t, c = time.perf_counter(), time.process_time()
        self.outs = self.llm.generate(self.batch, PARAMS(), use_progress=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        n = sum(len(o.token_ids) for o in self.outs)
        return n / wall, n / cpu

    def bitwise(self) -> bool:
        """The batch's first prompt alone gives what it gave in the batch, bit for bit."""
        self.llm.engine.blocks.reset_prefix_cache()
        alone = self.llm.generate([self.batch[0]], PARAMS(), use_progress=False)[0]
        inside = self.outs[0]
        return alone.token_ids == inside.token_ids and [lp.logprob for lp in alone.logprobs] == [
            lp.logprob for lp in inside.logprobs
        ]


def PARAMS() -> Any:  # noqa: ANN401, N802 - (imported late: the worker sets threads first)
    from llmos import SamplingParams

    return SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True, logprobs=1)


def worker(modes: list[str], threads: int, reps: int) -> dict[str, dict[str, Any]]:
    """Every mode's engine in this one process; each workload's reps alternate between them,
    so the machine's load drifts over all modes alike. Best of the reps."""
    import torch

    torch.set_num_threads(threads)
    benches = {mode: Bench(mode) for mode in modes}
    for b in benches.values():
        b.stream(b.chat, 8)  # warm up
    out: dict[str, dict[str, Any]] = {mode: {} for mode in modes}
    for key in ("decode_tps", "prefill_tps", "batch_tps"):
        for _ in range(reps):
            for mode, b in benches.items():
                fn = {"decode_tps": b.decode, "prefill_tps": b.prefill, "batch_tps": b.batched}
                wall, cpu = fn[key]()
                out[mode][key] = max(out[mode].get(key, 0.0), wall)
                out[mode]["cpu_" + key] = max(out[mode].get("cpu_" + key, 0.0), cpu)
                emit("progress", f"{mode} {key} {wall:.1f} per s, {cpu:.1f} per CPU s")
    for mode, b in benches.items():
        out[mode]["bitwise"] = b.bitwise()
    return out


def export(ref: str) -> Path:
    """The llmos package as it was at git `ref`, in a temporary folder (for PYTHONPATH)."""
    root = Path(__file__).resolve().parent.parent
    dest = Path(tempfile.mkdtemp(prefix="llmos-base-"))
    tar = subprocess.run(
        ["git", "-C", str(root), "archive", ref, "llmos"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest


def main(
    threads: int = 2,
    reps: Annotated[int, typer.Option(help="runs of each workload per mode, alternating")] = 3,
    base: Annotated[
        str | None, typer.Option(help="also run deterministic mode as of this git ref")
    ] = None,
    record: Annotated[Path | None, typer.Option()] = None,
) -> None:
    me = str(Path(__file__).resolve())
    # (OpenMP's wait policy: llmos's default, as users get it)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = str(threads)
    load0 = loadavg()
    show = console.print
    with console.status("default and deterministic, alternating…"):
        best = run_worker(
            [me, "worker", "default,deterministic", str(threads), str(reps)],
            on_line=show,
            env=env,
        )
    if base is not None:  # its own process (another llmos), after the others
        old = {**env, "PYTHONPATH": str(export(base))}
        with console.status(f"deterministic mode @{base}…"):
            r = run_worker([me, "worker", "deterministic", str(threads), str(reps)], show, old)
        best[f"deterministic @{base}"] = r["deterministic"]
    best.pop("spawn_to_exit", None)
    names = list(best)
    d = best["default"]
    rows = [
        [label + unit]
        + [f"{best[n][pre + key]:.1f}" for n in names]
        + [f"{best[n][pre + key] / d[pre + key]:.2f}×" for n in names[1:]]
        for pre, unit in (("", " (tok/s)"), ("cpu_", " (tokens per CPU second)"))
        for label, key in (
            ("single-stream decode", "decode_tps"),
            (f"{PREFILL_TOKENS}-token prefill", "prefill_tps"),
            (f"batch {BATCH} × {DECODE_TOKENS} tokens", "batch_tps"),
        )
    ]
    blank = [""] * (len(names) - 1)
    rows.append(["alone = in the batch, bitwise", *(str(best[n]["bitwise"]) for n in names)])
    rows[-1] += blank
    m = machine()
    head = ["workload", *names, *(f"{n} ÷ default" for n in names[1:])]
    cmd = f"--reps {reps}" + (f" --base {base}" if base else "")
    body = md_table(head, rows)
    body += (
        f"\n\n- `.venv/bin/python benchmarks/determinism.py {cmd}`, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {m['cpu']}, {m['cores']} cores, {threads} threads, "
        f"load average {load0:.1f} at the start and {loadavg():.1f} at the end. The machine is "
        f"shared: both modes' engines ran in one process, each workload's {reps} runs "
        "alternating between them, and each figure is the best run (the least disturbed)"
        + (f"; @{base} ran after them, in its own process." if base else ".")
        + " Tokens per CPU second (the process's user + system time, every thread) tell the "
        "cost apart from the wait for a core, which a loaded machine adds to the wall time."
    )
    print(body)
    if record is not None:
        replace_section(record, SECTION, body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        emit("result", worker(sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])))
    else:
        typer.run(main)
