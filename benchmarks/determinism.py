"""What deterministic mode costs: the default and the deterministic engine on the same three
workloads, each in its own worker process, one after another, in the same run.

    .venv/bin/python benchmarks/determinism.py [--threads 2] [--reps 3] [--record BENCHMARKS.md]

- single-stream decode: 128 greedy tokens (EOS ignored) after a short chat prompt; tokens/s
  over tokens 2..128. Best of `reps` (the machine is shared: the best run is the least
  disturbed one).
- prefill: a 512-token prompt to its first token (prefix cache cleared). Best of `reps`.
- batch 32: 32 prompts × 128 tokens at once. Best of `reps`.
- bitwise: the batch's first prompt alone and in the batch give the same tokens and logprobs
  (deterministic mode only promises this; the default mode is checked and reported too).

It prints both modes and deterministic ÷ default for each workload.
"""

from __future__ import annotations

import os
import sys
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


def main(
    threads: int = 2,
    reps: int = 3,
    record: Annotated[Path | None, typer.Option()] = None,
) -> None:
    me = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    load0 = loadavg()
    results: dict[str, dict[str, Any]] = {}
    for mode in ("default", "deterministic"):
        with console.status(f"{mode}…"):
            results[mode] = run_worker([me, "worker", mode, str(threads), str(reps)], env=env)
        r = results[mode]
        console.print(
            f"{mode}: decode {r['decode_tps']:.1f} tok/s, prefill {r['prefill_tps']:.0f} tok/s, "
            f"batch {BATCH} {r['batch_tps']:.0f} tok/s, alone = in batch: {r['bitwise']}"
        )
    d, x = results["default"], results["deterministic"]
    rows = [
        [
            name,
            f"{d[key]:.1f}",
            f"{x[key]:.1f}",
            f"{x[key] / d[key]:.2f}×",
        ]
        for name, key in (
            ("single-stream decode (tok/s)", "decode_tps"),
            (f"{PREFILL_TOKENS}-token prefill (tok/s)", "prefill_tps"),
            (f"batch {BATCH} × {DECODE_TOKENS} tokens (tok/s)", "batch_tps"),
        )
    ]
    rows.append(["alone = in the batch, bitwise", str(d["bitwise"]), str(x["bitwise"]), ""])
    rows.append(
        [
            "peak RSS (MiB)",
            f"{d['peak_rss'] / 2**20:.0f}",
            f"{x['peak_rss'] / 2**20:.0f}",
            "",
        ]
    )
    m = machine()
    body = md_table(["workload", "default", "deterministic", "deterministic ÷ default"], rows)
    body += (
        f"\n\n- `.venv/bin/python benchmarks/determinism.py --reps {reps}`, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {m['cpu']}, {m['cores']} cores, {threads} threads, "
        f"load average {load0:.1f} at the start and {loadavg():.1f} at the end (a shared "
        "machine: best of the reps, both modes in the same run)."
    )
    print(body)
    if record is not None:
        replace_section(record, SECTION, body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        emit("result", worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        typer.run(main)
