"""Speculative decoding on four workloads, on vs off in the same run, at batch 1 and 16.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/spec.py [--write] [--tokens N]

One engine with `speculation="suffix"` serves both sides: "off" requests carry
`SamplingParams(speculation=False)`, so weights, kernels and cache are the same. The suffix
proposer's global index (recent outputs) is emptied before every "on" run and the prefix cache
is reset before every run, so no run is helped by an earlier identical one (each run's prompts
are then prefilled untimed, so the figures are decoding's). Greedy outputs are checked equal on
vs off.

Workloads: a 60-line file rewritten with one change (code edit), an agent turn that quotes a
tool output, JSON extraction with a schema (constrained decoding), open prose. Reported: tok/s
off and on, their ratio, mean acceptance length (tokens per verification step with drafts),
and the effective tok/s as a share of the plain-decode bandwidth bound (memory bandwidth
measured in the same run ÷ bytes of weights read per step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import loadavg, md_table, peak_rss_bytes, replace_section  # noqa: E402

import llmos  # noqa: E402, F401  (before torch: OpenMP's wait policy)

HEADING = "## Speculative decoding"
NAMES = ["parse", "load", "store", "merge", "split", "check", "render", "fetch"]


def code_file(variant: int) -> str:
    lines = ['"""Small helpers for a key-value store."""', "", "import json", ""]
    for i, name in enumerate(NAMES):
        lines += [
            f"def {name}_{variant}(data, key):",
            f'    """{name.capitalize()} one entry of the store."""',
            "    if key not in data:",
            f"        return None  # nothing to {name}",
            f"    value = data[key] * {i + 1}",
            "    return json.dumps(value)",
            "",
        ]
    return "\n".join(lines[:60])


def workloads(variant: int) -> dict[str, tuple[list[dict[str, str]], dict[str, Any]]]:
    code = code_file(variant)
    tool = "\n".join(
        f"{t:02d}:{v:02d} worker-{variant} job={j} status={'ok' if j % 3 else 'retry'}"
        for t, (v, j) in enumerate(zip(range(10, 40, 3), range(100, 110), strict=False))
    )
    person = (
        f"Maria Lopez (employee {4100 + variant}) joined the Berlin office in 2019 as a data "
        "engineer. She speaks Spanish, English and German, and leads the ingestion team."
    )
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "employee_id": {"type": "integer"},
            "city": {"type": "string"},
            "year": {"type": "integer"},
            "role": {"type": "string"},
            "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        },
        "required": ["name", "employee_id", "city", "year", "role", "languages"],
    }
    return {
        "code edit": (
            [
                {
                    "role": "user",
                    "content": f"Here is a file:\n```python\n{code}\n```\nRewrite the whole "
                    "file with one change: the first function returns an empty string instead "
                    "of None. Reply with the complete file only.",
                }
            ],
            {},
        ),
        "agent quote": (
            [
                {"role": "user", "content": "What did the job log say? Quote it exactly."},
                {"role": "assistant", "content": "Calling read_log."},
                {"role": "user", "content": f"Tool output (read_log):\n{tool}"},
                {"role": "user", "content": "Quote the log lines verbatim, then summarize."},
            ],
            {},
        ),
        "json extraction": (
            [{"role": "user", "content": f"Extract the person as JSON.\n\n{person}"}],
            {"json_schema": schema},
        ),
        "prose": (
            [
                {
                    "role": "user",
                    "content": f"Write a short story about lighthouse keeper number {variant}.",
                }
            ],
            {},
        ),
    }


def bandwidth_gbs() -> float:
    import torch

    x = torch.ones(2**27)  # 512 MiB fp32: a streaming read, as decode reads the weights
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def run(llm: Any, batch: int, name: str, spec: bool, tokens: int) -> dict[str, Any]:  # noqa: ANN401
    from llmos import SamplingParams
    from llmos.engine.spec import SuffixProposer

    engine = llm.engine
    engine.blocks.reset_prefix_cache()
    engine.speculator.proposer = SuffixProposer()  # no help from an earlier identical run
    convs, extra = [], {}
    for v in range(batch):
        messages, extra = workloads(v)[name]
        convs.append(messages)
    # the prompts' prefill, untimed: what is timed is decoding (the prefix cache holds them)
    llm.chat(convs, SamplingParams(temperature=0, max_tokens=1), use_progress=False)
    params = SamplingParams(temperature=0, max_tokens=tokens, speculation=spec, **extra)
    before = list(engine.spec_totals)
    t = time.perf_counter()
    outs = llm.chat(convs, params, use_progress=False)
    wall = time.perf_counter() - t
    drafts, drafted, accepted = (a - b for a, b in zip(engine.spec_totals, before, strict=True))
    n = sum(len(o.token_ids) for o in outs)
    return {
        "tps": n / wall,
        "tokens": n,
        "outputs": [o.token_ids for o in outs],
        "accept_len": 1 + accepted / drafts if drafts else 1.0,
        "drafted": drafted,
        "accepted": accepted,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="record in BENCHMARKS.md")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--workloads", default=None, help="comma-separated names (default: all)")
    args = ap.parse_args()
    from llmos import LLM
    from llmos.models.quant import weight_bytes

    llm = LLM(speculation="suffix", num_speculative_tokens=args.k, kv_cache_memory="1GiB")
    bw = bandwidth_gbs()
    wbytes = weight_bytes(llm.engine.model)
    bound = bw * 1e9 / wbytes  # plain decode, one stream: every token reads every weight
    llm.chat([{"role": "user", "content": "Hi"}])  # warm up
    rows, results = [], {}
    load = [loadavg()]
    for batch in (int(b) for b in args.batches.split(",")):
        for name in args.workloads.split(",") if args.workloads else workloads(0):
            # untimed: an engine's first run of a workload came out up to 25% faster than the
            # runs after it, whichever mode it was, and would have favoured that mode
            run(llm, batch, name, False, args.tokens)
            # off, on, on, off: a steady drift of the engine's speed cancels in the means
            off = run(llm, batch, name, False, args.tokens)
            on = run(llm, batch, name, True, args.tokens)
            on2 = run(llm, batch, name, True, args.tokens)
            off2 = run(llm, batch, name, False, args.tokens)
            load.append(loadavg())
            same = off["outputs"] == on["outputs"] == on2["outputs"]
            t_off = (off["tps"] + off2["tps"]) / 2
            t_on = (on["tps"] + on2["tps"]) / 2
            results[(batch, name)] = (t_off, t_on, on["accept_len"], same)
            rows.append(
                [
                    name,
                    str(batch),
                    f"{t_off:.1f}",
                    f"{t_on:.1f}",
                    f"**{t_on / t_off:.2f}×**",
                    f"{on['accept_len']:.2f}",
                    f"{on['accepted']}/{on['drafted']}",
                    f"{t_off / bound:.0%}",
                    f"{t_on / bound:.0%}",
                    "yes" if same else "NO",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    head = [
        "workload",
        "batch",
        "off tok/s",
        "on tok/s",
        "on ÷ off",
        "accept len",
        "accepted/drafted",
        "off ÷ bound",
        "on ÷ bound",
        "greedy equal",
    ]
    table = md_table(head, rows)
    cpu = os.cpu_count()
    body = (
        f"`.venv/bin/python benchmarks/spec.py --write --tokens {args.tokens} --k {args.k} "
        f"--batches {args.batches}` "
        f"(greedy, {args.tokens} new tokens per request, k ≤ {args.k}, suffix proposer; each "
        "figure the mean of two runs, in the order off, on, on, off after an untimed one, on "
        "one engine).\n\n"
        f"{table}\n\n"
        f"Machine: {cpu} cores; memory read bandwidth {bw:.1f} GB/s measured in the same run; "
        f"{wbytes / 2**20:.0f} MiB of weights read per step, so plain decode's bound is "
        f"{bound:.0f} tok/s for one stream (the 'bound' columns are tok/s ÷ that; at batch 16 "
        "one weight read serves 16 tokens, so shares past 100% are expected there). Load "
        f"average during the run: {min(load):.1f}–{max(load):.1f} (other work shared the "
        "cores: the ratios, measured in the same run, are what count). Peak RSS "
        f"{peak_rss_bytes() / 2**20:.0f} MiB."
    )
    print(body)
    if args.write:
        replace_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", HEADING, body)


if __name__ == "__main__":
    main()
