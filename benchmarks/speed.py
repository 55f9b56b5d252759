"""Speed against the machine and the competition: single-stream decode, a 500-token prefill and
a batch of 32, for llmos in each precision mode, llama.cpp (llama-cpp-python) and HF
transformers on the same GGUF, each engine in its own process, one after another, 2 threads.

    .venv/bin/python benchmarks/speed.py [--modes auto,q8,q4,fp32] [--skip-hf]
                                         [--skip-llamacpp] [--record BENCHMARKS.md]

- single-stream decode: 128 greedy tokens (EOS ignored) after a short chat prompt; tokens/s
  over tokens 2..128 (the first comes with the prefill). Median of 3.
- prefill: a 500-token prompt to its first token (prefix cache cleared). Median of 3.
- batch 32: 32 prompts × 128 tokens at once (llmos, HF; llama.cpp serves one at a time).
- llama.cpp's own `llama-bench` (tg128, pp500) where `make bench-setup` built it; it is the
  ÷ llama.cpp anchor when llama-cpp-python is not installed.
- the machine's limits, measured here first: memory read bandwidth (a 1 GiB fp32 sum) and
  fp32 matmul rate (2048² × 2048²), on the same threads. Decode is then compared with
  bandwidth ÷ bytes of weights read per token, prefill with matmul rate ÷ FLOPs per token.
- accuracy per llmos mode: perplexity on a fixed text (each mode's own kernels on every row)
  and greedy agreement with fp32 over the single-stream tokens.
- memory: peak RSS of each worker, and KV cache bytes per token.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
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
PREFILL_TOKENS = 500
BATCH = 32
REPS = 3
SECTION = "## Speed (benchmarks/speed.py)"
console = Console(stderr=True)


def prompts(encode: Any) -> tuple[list[int], list[list[int]]]:  # noqa: ANN401
    """(a 500-token prompt, 32 batch prompts) as token ids."""
    text = " ".join(CORPUS * 4)
    ids = encode(text)
    long = ids[:PREFILL_TOKENS]
    batch = [ids[i * 37 : i * 37 + 40 + (i % 5) * 20] for i in range(BATCH)]
    return long, batch


Stream = Callable[[list[int], int], tuple[list[int], list[float]]]


def decode_and_prefill(
    stream: Stream, chat: list[int], long: list[int]
) -> tuple[float, float, list[int]]:
    """Median decode tok/s over tokens 2..128, median prefill tok/s of the long prompt, and the
    decoded tokens; `stream(ids, n)` returns the n tokens and the time each came out."""
    stream(chat, 8)  # warm up
    decode, tokens = [], []
    for _ in range(REPS):
        tokens, times = stream(chat, DECODE_TOKENS)
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    prefill = []
    for _ in range(REPS):
        t = time.perf_counter()
        stream(long, 1)
        prefill.append(PREFILL_TOKENS / (time.perf_counter() - t))
    return statistics.median(decode), statistics.median(prefill), tokens


# -- the machine -------------------------------------------------------------------------------
def read_bandwidth(nbytes: int, threads: int, reps: int = 7) -> float:
    """GB/s of reading `nbytes` again and again (a sum over them, best of `reps`): at 1 GiB the
    memory's rate; at a decode step's weight bytes, the rate that bounds decode on this machine
    (those bytes stay in a last-level cache that holds them)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(max(nbytes // 4, 1))
    x.sum()
    return x.numel() * 4 / min(_timed(lambda: x.sum()) for _ in range(reps)) / 1e9


def caches() -> dict[str, int]:
    """The CPU's data and unified cache sizes in bytes by level ({"L1d": ..., "L3": ...})."""
    out: dict[str, int] = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (d / "type").read_text().strip()
            size = (d / "size").read_text().strip()
            level = (d / "level").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        n = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        out[f"L{level}{'d' if kind == 'Data' else ''}"] = n
    return out


def machine_limits(threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    mm = min(_timed(lambda: a @ b) for _ in range(5))
    return {
        "bandwidth_gbs": read_bandwidth(1 << 30, threads),
        "matmul_gflops": 2 * 2048**3 / mm / 1e9,
    }


def _timed(fn: Any) -> float:  # noqa: ANN401
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- workers -----------------------------------------------------------------------------------
def llmos_worker(mode: str, threads: int) -> dict[str, Any]:
    import torch

    from llmos import LLM, SamplingParams
    from llmos.engine.runner import ModelRunner
    from llmos.models.quant import weight_bytes

    torch.set_num_threads(threads)
    llm = LLM(model=MODEL, quantization=mode, kv_cache_memory="1GiB")
    engine = llm.engine
    chat = llm.tokenizer.encode_chat(CHAT)
    long, batch = prompts(llm.tokenizer.encode)
    greedy = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)

    def stream(ids: list[int], n: int) -> tuple[list[int], list[float]]:
        engine.blocks.reset_prefix_cache()
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.add_request("s", ids, params)
        times: list[float] = []
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                times.append(time.perf_counter())
                tokens = out.outputs[0].token_ids
        return tokens, times

    decode, prefill, tokens = decode_and_prefill(stream, chat, long)
    t = time.perf_counter()
    outs = llm.generate(batch, greedy, use_progress=False)
    batch_tps = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    rss = peak_rss_bytes()  # (before perplexity() loads a second model)
    return {
        "decode_tps": decode,
        "prefill_tps": prefill,
        "batch_tps": batch_tps,
        "tokens": tokens,
        "perplexity": perplexity(mode),
        "weight_bytes": weight_bytes(engine.model),
        "kv_bytes_per_token": ModelRunner.kv_bytes_per_token(engine.model, torch.float32),
        "formats": engine.weight_formats,
        "peak_rss": rss,
    }


def perplexity(mode: str) -> float:
    """Perplexity of the model in `mode` on a fixed 512-token text, with the mode's kernels on
    every row (a plain forward pass over one sequence)."""
    import torch

    from llmos.models.attention import AttentionMetadata, PrefillChunk
    from llmos.models.llama import LlamaModel
    from llmos.models.loader import load_checkpoint
    from llmos.models.quant import quantize
    from llmos.models.registry import resolve

    ckpt = load_checkpoint(resolve(MODEL))
    model = LlamaModel.from_weights(ckpt.config, ckpt.weights).eval()
    quantize(model, mode, max_rows=1 << 30)
    ids = torch.tensor(ckpt.tokenizer.encode(" ".join(CORPUS))[:512])
    n, cfg, bs = len(ids), ckpt.config, 16
    caches = [
        (
            torch.zeros(n // bs + 1, bs, cfg.num_kv_heads, cfg.head_dim),
            torch.zeros(n // bs + 1, bs, cfg.num_kv_heads, cfg.head_dim),
        )
        for _ in range(cfg.num_layers)
    ]
    meta = AttentionMetadata(
        torch.arange(n), [PrefillChunk(0, n, n, torch.arange(n // bs + 1), None)], bs
    )
    with torch.inference_mode():
        logits = model(ids, torch.arange(n), caches, meta, torch.arange(n - 1))
        nll = torch.nn.functional.cross_entropy(logits, ids[1:])
    return float(nll.exp())


def llamacpp_worker(threads: int) -> dict[str, Any]:
    import gguf
    from llama_cpp import Llama

    from llmos.models.registry import resolve

    path = resolve(MODEL)
    llm = Llama(
        model_path=str(path),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=1024,
        n_batch=512,
        verbose=False,
    )
    from llmos.models.loader import load_checkpoint
    from llmos.models.tokenizer import Tokenizer  # the same token ids as llmos

    tok: Tokenizer = load_checkpoint(path).tokenizer
    chat = tok.encode_chat(CHAT)
    long, _ = prompts(tok.encode)

    def stream(ids: list[int], n: int) -> tuple[list[int], list[float]]:
        llm.reset()
        tokens, times = [], []
        for t in llm.generate(
            ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        ):
            tokens.append(t)
            times.append(time.perf_counter())
            if len(tokens) == n:
                break
        return tokens, times

    decode, prefill, tokens = decode_and_prefill(stream, chat, long)
    reader = gguf.GGUFReader(path)
    cfg = load_checkpoint(path).config
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # its default f16 cache
    return {
        "decode_tps": decode,
        "prefill_tps": prefill,
        "batch_tps": None,
        "tokens": tokens,
        "perplexity": None,
        "weight_bytes": sum(int(t.n_bytes) for t in reader.tensors),
        "kv_bytes_per_token": kv,
        "peak_rss": peak_rss_bytes(),
    }


# llama.cpp's own benchmark tool, built beside llama-server by `make bench-setup`
LLAMA_BENCH = Path(__file__).resolve().parent.parent / ".venv" / "bench" / "llama-bench"


def llamabench_worker(threads: int) -> dict[str, Any]:
    """llama.cpp's own figures from `llama-bench` on the same GGUF and threads: tg128 (decode
    after an empty context) and pp500 (a 500-token prompt), each the mean of 3 repetitions."""
    import json
    import subprocess

    import gguf

    from llmos.models.registry import resolve

    path = resolve(MODEL)
    cmd = [str(LLAMA_BENCH), "-m", str(path), "-t", str(threads), "-r", str(REPS), "-o", "json"]
    cmd += ["-p", str(PREFILL_TOKENS), "-n", str(DECODE_TOKENS)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    tests = json.loads(out)
    rate = {("pp" if t["n_prompt"] else "tg"): float(t["avg_ts"]) for t in tests}
    return {
        "decode_tps": rate["tg"],
        "prefill_tps": rate["pp"],
        "batch_tps": None,
        "tokens": None,
        "perplexity": None,
        "weight_bytes": sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors),
        "kv_bytes_per_token": None,
        "peak_rss": None,  # (llama-bench does not report it)
    }


def hf_worker(threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from llmos.models.loader import load_checkpoint
    from llmos.models.registry import resolve

    torch.set_num_threads(threads)
    path = resolve(MODEL)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = load_checkpoint(path).tokenizer
    chat = tok.encode_chat(CHAT)
    long, batch = prompts(tok.encode)
    pad = tok.eos_token_ids[0]

    def generate(rows: list[list[int]], n: int) -> float:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
        return time.perf_counter() - t

    generate([chat], 4)
    first = statistics.median(generate([chat], 1) for _ in range(REPS))
    decode = statistics.median(
        (DECODE_TOKENS - 1) / (generate([chat], DECODE_TOKENS) - first) for _ in range(REPS)
    )
    prefill = statistics.median(PREFILL_TOKENS / generate([long], 1) for _ in range(REPS))
    batch_tps = BATCH * DECODE_TOKENS / generate(batch, DECODE_TOKENS)
    params = sum(p.numel() for p in model.parameters())
    return {
        "decode_tps": decode,
        "prefill_tps": prefill,
        "batch_tps": batch_tps,
        "tokens": None,
        "perplexity": None,
        "weight_bytes": params * 4,
        "kv_bytes_per_token": None,
        "peak_rss": peak_rss_bytes(),
    }


# -- the report --------------------------------------------------------------------------------
def prefill_flops_per_token() -> float:
    """Linear layers (2 × their parameters) plus causal attention at the 500-token prompt's
    mean context; the LM head runs for the last token only."""
    from llmos.models.loader import load_checkpoint
    from llmos.models.registry import resolve

    cfg = load_checkpoint(resolve(MODEL)).config
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    linear = cfg.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size)
    attention = cfg.num_layers * 2 * 2 * q * (PREFILL_TOKENS / 2)
    return 2 * linear + attention + 2 * cfg.vocab_size * h / PREFILL_TOKENS


def report(limits: dict[str, float], results: dict[str, dict[str, Any]], threads: int) -> str:
    bw, mm = limits["bandwidth_gbs"] * 1e9, limits["matmul_gflops"] * 1e9
    at_size: dict[int, float] = limits.get("at_size", {})  # type: ignore[assignment]
    flops = prefill_flops_per_token()
    # the anchor: llama-cpp-python where it ran, else llama.cpp's own llama-bench
    lc = results.get("llama.cpp") or results.get("llama.cpp (llama-bench)")
    ref = results.get("llmos fp32", {}).get("tokens")
    rows = []
    for name, r in results.items():
        decode_limit = bw / r["weight_bytes"]
        ws = at_size.get(r["weight_bytes"])
        ws_limit = ws * 1e9 / r["weight_bytes"] if ws else None
        agree = "—"
        if ref and r.get("tokens"):
            same = sum(a == b for a, b in zip(r["tokens"], ref, strict=False))
            agree = f"{same / len(ref):.0%}"
        rows.append(
            [
                name,
                f"{r['decode_tps']:.1f}",
                f"{r['decode_tps'] / lc['decode_tps']:.2f}×" if lc else "—",
                f"{r['decode_tps'] / decode_limit:.0%} of {decode_limit:.0f}",
                f"{r['decode_tps'] / ws_limit:.0%} of {ws_limit:.0f}" if ws_limit else "—",
                f"{r['prefill_tps']:.0f}",
                f"{r['prefill_tps'] / lc['prefill_tps']:.2f}×" if lc else "—",
                f"{r['prefill_tps'] * flops / mm:.0%}",
                f"{r['batch_tps']:.0f}" if r.get("batch_tps") else "—",
                f"{r['perplexity']:.3f}" if r.get("perplexity") else "—",
                agree,
                f"{r['weight_bytes'] / 2**20:.0f}",
                f"{r['peak_rss'] / 2**20:.0f}" if r.get("peak_rss") else "—",
                f"{r['kv_bytes_per_token'] / 1024:.0f}" if r.get("kv_bytes_per_token") else "—",
            ]
        )
    head = [
        "engine",
        "decode tok/s",
        "÷ llama.cpp",
        "of bandwidth bound (tok/s)",
        "of the bound at the weights' size (tok/s)",
        "prefill tok/s",
        "÷ llama.cpp",
        "of matmul peak",
        f"batch {BATCH} tok/s",
        "perplexity",
        "greedy = fp32",
        "weights read/token (MiB)",
        "peak RSS (MiB)",
        "KV KiB/token",
    ]
    m = machine()
    sizes = ", ".join(f"{v:.1f} GB/s at {k / 2**20:.0f} MiB" for k, v in at_size.items())
    notes = [
        f"`.venv/bin/python benchmarks/speed.py --record BENCHMARKS.md`, "
        f"{time.strftime('%Y-%m-%d')}"
        f", {m['cpu']}, {m['cores']} cores, {threads} threads for every engine, load average "
        f"{loadavg():.1f} at the end.",
        f"Machine limits measured in the same run: memory read {limits['bandwidth_gbs']:.1f} "
        f"GB/s (sum of 1 GiB), fp32 matmul {limits['matmul_gflops']:.0f} GFLOP/s (2048³). "
        f"Caches: {', '.join(f'{k} {v / 2**20:g} MiB' for k, v in caches().items()) or '?'}; "
        "the bound at the weights' size reads a buffer as big as that engine's weights read per "
        f"token, again and again ({sizes}): "
        "where a last-level cache holds the weights, that rate and not the memory's bounds decode. "
        f"Bandwidth bound = bandwidth ÷ weights read per token; prefill FLOPs = "
        f"{flops / 1e6:.0f} MFLOP per token.",
        f"Decode: {DECODE_TOKENS} greedy tokens after a short chat prompt. Prefill: "
        f"{PREFILL_TOKENS} tokens to the first output token. Medians of {REPS}.",
        "Perplexity: 511 next tokens of a fixed text, each mode's kernels on every row. "
        "greedy = fp32: share of the 128 decode tokens equal to llmos fp32's.",
        "Peak RSS: the worker's high-water mark after decode, prefill and batch (llmos: before "
        "the perplexity pass loads a second copy of the model).",
    ]
    return md_table(head, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def main(
    modes: Annotated[str, typer.Option(help="llmos precision modes")] = "auto,q8,q4,fp32",
    threads: int = 2,
    skip_hf: bool = False,
    skip_llamacpp: bool = False,
    record: Annotated[Path | None, typer.Option()] = None,
) -> None:
    me = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    console.print("measuring the machine's limits…")
    limits = machine_limits(threads)
    console.print(limits)
    jobs = [(f"llmos {m}", ["worker", "llmos", m]) for m in modes.split(",")]
    if not skip_llamacpp:
        jobs.append(("llama.cpp", ["worker", "llamacpp", "-"]))
        if LLAMA_BENCH.exists():
            jobs.append(("llama.cpp (llama-bench)", ["worker", "llamabench", "-"]))
    if not skip_hf:
        jobs.append(("HF transformers fp32", ["worker", "hf", "-"]))
    results: dict[str, dict[str, Any]] = {}
    for name, args in jobs:
        with console.status(f"{name}…"):
            try:
                results[name] = run_worker([me, *args, str(threads)], env=env)
            except Exception as exc:  # noqa: BLE001 - report the others
                console.print(f"[red]{name} failed:[/] {exc}")
                continue
        r = results[name]
        console.print(
            f"{name}: decode {r['decode_tps']:.1f} tok/s, prefill "
            f"{r['prefill_tps']:.0f} tok/s, batch {r.get('batch_tps')}"
        )
    limits["at_size"] = {  # type: ignore[assignment]
        n: read_bandwidth(n, threads) for n in sorted({r["weight_bytes"] for r in results.values()})
    }
    console.print({"read GB/s at each engine's weight bytes": limits["at_size"]})
    body = report(limits, results, threads)
    print(body)
    if record is not None:
        replace_section(record, SECTION, body)


def worker(engine: str, mode: str, threads: int) -> None:
    if engine == "llmos":
        emit("result", llmos_worker(mode, threads))
    elif engine == "llamacpp":
        emit("result", llamacpp_worker(threads))
    elif engine == "llamabench":
        emit("result", llamabench_worker(threads))
    else:
        emit("result", hf_worker(threads))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        typer.run(main)
