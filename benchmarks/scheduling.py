"""Prefix caching, deterministic mode and batch composition (issue 4), in one run.

    .venv/bin/python benchmarks/scheduling.py [--record BENCHMARKS.md]

1. Prefix cache: TTFT of a request whose 1,500-token prefix is cached, against the cold one.
2. Deterministic mode: throughput of the same batch (and single-stream decode) with
   `deterministic=True` against the default.
3. Batch composition: how often default-mode greedy output of a prompt run alone differs from
   the same prompt run inside a batch of mixed others (floating-point near-ties flip tokens);
   deterministic mode, by construction, never differs.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine, md_table, replace_section  # noqa: E402

from llmos import LLM, SamplingParams  # noqa: E402

console = Console(stderr=True)
WORDS = (
    "the river kernel page cache token moon quietly because seven system memory process "
    "agent tool scheduler block prefix"
).split()


def text_of(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    engine = llm.engine
    t0 = time.perf_counter()
    engine.add_request("ttft", prompt, SamplingParams(temperature=0, max_tokens=1))
    cached = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            cached = out.num_cached_tokens
    return time.perf_counter() - t0, cached


def prefix_cache(llm: LLM, prefix_tokens: int) -> dict[str, float]:
    rng = random.Random(0)
    prefix = llm.tokenizer.encode(text_of(rng, prefix_tokens * 2))[:prefix_tokens]
    q1 = llm.tokenizer.encode(" Question: which word comes first?", add_special_tokens=False)
    q2 = llm.tokenizer.encode(" Question: which word comes last?", add_special_tokens=False)
    llm.engine.blocks.reset_prefix_cache()
    ttft(llm, [1, 2, 3])  # warm up kernels
    cold, _ = ttft(llm, prefix + q1)
    warm, cached = ttft(llm, prefix + q2)
    return {
        "cold_s": cold,
        "warm_s": warm,
        "ratio": warm / cold,
        "cached_tokens": cached,
        "prompt_tokens": len(prefix) + len(q2),
    }


def throughput(llm: LLM, n: int, max_tokens: int) -> float:
    rng = random.Random(1)
    prompts = [text_of(rng, rng.randint(10, 80)) for _ in range(n)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.engine.blocks.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_progress=False)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def divergence(llm: LLM, n: int, max_tokens: int) -> tuple[int, int]:
    """(prompts whose greedy output changed inside a mixed batch, prompts tried)."""
    rng = random.Random(2)
    prompts = [text_of(rng, rng.randint(5, 60)) for _ in range(n)]
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    alone = [llm.generate(p, greedy, use_progress=False)[0].token_ids for p in prompts]
    mixed_params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randint(8, 64)) for i in range(16)
    ]
    fillers = [text_of(rng, rng.randint(5, 200)) for _ in range(16)]
    outs = llm.generate(prompts + fillers, [greedy] * n + mixed_params, use_progress=False)
    return sum(a != o.token_ids for a, o in zip(alone, outs, strict=False)), n


def main(
    record: Annotated[Path | None, typer.Option(help="Write a section here.")] = None,
    prefix_tokens: int = 1500,
    batch: int = 32,
    max_tokens: int = 64,
    divergence_prompts: int = 32,
) -> None:
    rows = []
    default = LLM()
    det = LLM(deterministic=True)
    pc = prefix_cache(default, prefix_tokens)
    pc_det = prefix_cache(det, prefix_tokens)
    rows.append(
        [
            "prefix cache TTFT, warm / cold (default)",
            f"{pc['warm_s'] * 1e3:.0f} ms / {pc['cold_s'] * 1e3:.0f} ms = {pc['ratio']:.1%}"
            f" ({pc['cached_tokens']} of {pc['prompt_tokens']} tokens cached)",
        ]
    )
    rows.append(
        [
            "prefix cache TTFT, warm / cold (deterministic)",
            f"{pc_det['warm_s'] * 1e3:.0f} ms / {pc_det['cold_s'] * 1e3:.0f} ms = "
            f"{pc_det['ratio']:.1%}",
        ]
    )
    t_def, t_det = throughput(default, batch, max_tokens), throughput(det, batch, max_tokens)
    rows.append(
        [
            f"batch {batch} × {max_tokens} tokens, output tok/s (default → deterministic)",
            f"{t_def:.1f} → {t_det:.1f} ({t_det / t_def:.2f}×)",
        ]
    )
    s_def, s_det = throughput(default, 1, 128), throughput(det, 1, 128)
    rows.append(
        [
            "single stream, 128 tokens, tok/s (default → deterministic)",
            f"{s_def:.1f} → {s_det:.1f} ({s_det / s_def:.2f}×)",
        ]
    )
    d_def = divergence(default, divergence_prompts, max_tokens)
    d_det = divergence(det, divergence_prompts, max_tokens)
    rows.append(
        [
            f"greedy outputs ({max_tokens} tokens) that change inside a mixed batch",
            f"default {d_def[0]}/{d_def[1]}, deterministic {d_det[0]}/{d_det[1]}",
        ]
    )
    floor = "PASS" if pc["ratio"] <= 0.15 else "FAIL"
    rows.append(["floor: warm TTFT ≤ 15% of cold", floor])
    m = machine()
    body = (
        f"Command: `.venv/bin/python benchmarks/scheduling.py --record BENCHMARKS.md`\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores; load average at the end "
        f"{loadavg():.1f}.\n\n" + md_table(["measure", "result"], rows)
    )
    console.print(body)
    if record is not None:
        replace_section(
            record, "## Prefix cache and deterministic mode (benchmarks/scheduling.py)", body
        )


if __name__ == "__main__":
    typer.run(main)
