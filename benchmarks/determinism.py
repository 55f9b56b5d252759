"""What deterministic mode costs: the default and the deterministic engine on the same three
workloads, each in its own worker process, one after another, in the same run.

    .venv/bin/python benchmarks/determinism.py [--threads 2] [--reps 3] [--base REF]
                                               [--record BENCHMARKS.md]

- single-stream decode: 128 greedy tokens (EOS ignored) after a short chat prompt; tokens/s
  over tokens 2..128.
- prefill: a 512-token prompt to its first token (prefix cache cleared).
- batch 32: 32 prompts × 128 tokens at once.
- each mode runs in `reps` worker processes, the modes alternating; the best run counts (the
  machine is shared: the best run is the least disturbed one).
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
    peak_rss_bytes,
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


def worker(mode: str, threads: int, reps: int) -> dict[str, Any]:
    import torch

    from llmos import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(model=MODEL, deterministic=mode == "deterministic", kv_cache_memory="1GiB")
    engine = llm.engine
    chat = llm.tokenizer.encode_chat(CHAT)
    ids = llm.tokenizer.encode(" ".join(CORPUS * 4))
    long = ids[:PREFILL_TOKENS]
    batch = [ids[i * 37 : i * 37 + 40 + (i % 5) * 20] for i in range(BATCH)]

    def stream(prompt: list[int], n: int) -> list[float]:
        engine.blocks.reset_prefix_cache()
        greedy = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.add_request("s", prompt, greedy)
        times: list[float] = []
        while engine.has_unfinished_requests():
            if engine.step():
                times.append(time.perf_counter())
        return times

    stream(chat, 8)  # warm up
    decode = []
    for _ in range(reps):
        times = stream(chat, DECODE_TOKENS)
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    prefill = []
    for _ in range(reps):
        t = time.perf_counter()
        stream(long, 1)
        prefill.append(PREFILL_TOKENS / (time.perf_counter() - t))
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True, logprobs=1)
    batch_tps, outs = [], []
    for _ in range(reps):
        engine.blocks.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_progress=False)
        batch_tps.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
    engine.blocks.reset_prefix_cache()
    alone = llm.generate([batch[0]], params, use_progress=False)[0]
    bitwise = alone.token_ids == outs[0].token_ids and [lp.logprob for lp in alone.logprobs] == [
        lp.logprob for lp in outs[0].logprobs
    ]
    return {
        "decode_tps": max(decode),
        "prefill_tps": max(prefill),
        "batch_tps": max(batch_tps),
        "bitwise": bitwise,
        "peak_rss": peak_rss_bytes(),
    }


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
    reps: Annotated[int, typer.Option(help="worker processes per mode, interleaved")] = 3,
    base: Annotated[
        str | None, typer.Option(help="also run deterministic mode as of this git ref")
    ] = None,
    record: Annotated[Path | None, typer.Option()] = None,
) -> None:
    me = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    modes: list[tuple[str, str, dict[str, str]]] = [
        ("default", "default", env),
        ("deterministic", "deterministic", env),
    ]
    if base is not None:
        old = {**env, "PYTHONPATH": str(export(base))}
        modes.append((f"deterministic @{base}", "deterministic", old))
    load0 = loadavg()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in modes}
    for rep in range(reps):  # the modes alternate, so the machine's load drifts over all alike
        for name, mode, e in modes:
            with console.status(f"{name}, run {rep + 1} of {reps}…"):
                r = run_worker([me, "worker", mode, str(threads), "1"], env=e)
            runs[name].append(r)
            console.print(
                f"{name}: decode {r['decode_tps']:.1f} tok/s, prefill {r['prefill_tps']:.0f} "
                f"tok/s, batch {BATCH} {r['batch_tps']:.0f} tok/s, alone = in batch: "
                f"{r['bitwise']}, load {loadavg():.1f}"
            )
    keys = ("decode_tps", "prefill_tps", "batch_tps")
    best = {
        name: {
            **{k: max(r[k] for r in rs) for k in keys},
            "bitwise": all(r["bitwise"] for r in rs),
            "peak_rss": max(r["peak_rss"] for r in rs),
        }
        for name, rs in runs.items()
    }
    names = list(best)
    d = best["default"]
    rows = [
        [label]
        + [f"{best[n][key]:.1f}" for n in names]
        + [f"{best[n][key] / d[key]:.2f}×" for n in names[1:]]
        for label, key in (
            ("single-stream decode (tok/s)", "decode_tps"),
            (f"{PREFILL_TOKENS}-token prefill (tok/s)", "prefill_tps"),
            (f"batch {BATCH} × {DECODE_TOKENS} tokens (tok/s)", "batch_tps"),
        )
    ]
    blank = [""] * (len(names) - 1)
    rows.append(["alone = in the batch, bitwise", *(str(best[n]["bitwise"]) for n in names)])
    rows[-1] += blank
    rows.append(["peak RSS (MiB)", *(f"{best[n]['peak_rss'] / 2**20:.0f}" for n in names)])
    rows[-1] += blank
    m = machine()
    head = ["workload", *names, *(f"{n} ÷ default" for n in names[1:])]
    cmd = f"--reps {reps}" + (f" --base {base}" if base else "")
    body = md_table(head, rows)
    body += (
        f"\n\n- `.venv/bin/python benchmarks/determinism.py {cmd}`, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {m['cpu']}, {m['cores']} cores, {threads} threads, "
        f"load average {load0:.1f} at the start and {loadavg():.1f} at the end. The machine is "
        "shared: each mode ran in {reps} worker processes, the modes alternating, and each "
        "figure is the best run (the least disturbed)."
    ).replace("{reps}", str(reps))
    print(body)
    if record is not None:
        replace_section(record, SECTION, body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        emit("result", worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        typer.run(main)
