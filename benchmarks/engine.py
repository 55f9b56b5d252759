"""llmos vs HF transformers vs llama.cpp on one workload, each engine in its own process.

    .venv/bin/python benchmarks/engine.py [--quick] [--skip-hf] [--skip-llamacpp]
                                          [--record BENCHMARKS.md] [--json results.json]

The workload: N prompts (default 64) of 20–600 tokens cut from varied natural text by a seeded
RNG and measured with the llmos tokenizer; each with its own max_tokens in 16–256; greedy;
EOS ignored. Every engine gets the same token ids and arrives at t0 with all of them, so TTFT
includes queueing for engines that take requests in turn.

- llmos: `LLM.generate` over all requests at once (continuous batching).
- HF transformers: the same GGUF dequantized to fp32, `generate` in static batches of 8 in
  arrival order, left padded. A batch runs to its longest max_tokens (min_new_tokens pins the
  length); only each request's own max_tokens count as useful output.
- llama.cpp (llama-cpp-python): the same GGUF, 2 threads, one request after another.

Also: single-stream decode speed, and cold start from a fresh process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (the benchmarks folder is not a package)
    WorkerError,
    Workload,
    build_workload,
    common_prefix,
    cpu_seconds,
    cpu_stall_us,
    emit,
    loadavg,
    machine,
    md_table,
    peak_rss_bytes,
    replace_section,
    rss_bytes,
    run_worker,
    stall_share,
    ttft_summary,
    wait_quiet,
)

MODEL = "smollm2-135m"
ENGINES = ("llmos", "hf", "llamacpp")
LABELS = {"llmos": "llmos", "hf": "HF transformers", "llamacpp": "llama.cpp"}
CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
SECTION = "## Engine (benchmarks/engine.py)"
console = Console(stderr=True)


@dataclass(slots=True)
class Done:
    token_ids: list[int]
    first_token: float  # time.monotonic()


class Runner(Protocol):
    def workload(self, w: Workload, tick: Callable[[int], None]) -> list[Done]: ...

    def stream(self, prompt: list[int], n: int) -> list[float]:
        """Greedy, EOS ignored; the monotonic time at which each of the n tokens was out."""
        ...


# -- the engines (each runs only inside its own worker process) ------------------------------
class LlmosRunner:
    def __init__(self, threads: int) -> None:
        import torch

        from llmos import LLM

        torch.set_num_threads(threads)
        self.llm = LLM(model=MODEL)
        self.cached_tokens = 0

    def _params(self, n: int) -> Any:
        from llmos import SamplingParams

        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def workload(self, w: Workload, tick: Callable[[int], None]) -> list[Done]:
        outs = self.llm.generate(
            w.prompts, [self._params(m) for m in w.max_tokens], use_progress=False
        )
        tick(len(outs))
        self.cached_tokens = sum(o.num_cached_tokens for o in outs)  # prefix-cache hits
        return [Done(list(o.token_ids), o.metrics["first_token"]) for o in outs]

    def stream(self, prompt: list[int], n: int) -> list[float]:
        out = self.llm.generate([prompt], self._params(n), use_progress=False)[0]
        end = time.monotonic()
        # generate() hands back finished requests only: spread the decode evenly for the rate.
        first = out.metrics["first_token"]
        return [first + (end - first) * i / (n - 1) for i in range(n)]


class HFRunner:
    def __init__(self, threads: int, batch_size: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from llmos.models.registry import resolve

        torch.set_num_threads(threads)
        path = resolve(MODEL)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        self.batch_size = batch_size
        self.pad = self.model.generation_config.eos_token_id
        if isinstance(self.pad, list):
            self.pad = self.pad[0]

    def _generate(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[float]]:
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        times: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value: Any) -> None:
                times.append(time.monotonic())  # the first put is the prompt itself

            def end(self) -> None:
                pass

        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad,
                streamer=Clock(),
            )
        return out[:, width:].tolist(), times[1:]

    def workload(self, w: Workload, tick: Callable[[int], None]) -> list[Done]:
        done: list[Done] = []
        for b in range(0, len(w.prompts), self.batch_size):
            prompts = w.prompts[b : b + self.batch_size]
            wants = w.max_tokens[b : b + self.batch_size]
            rows, times = self._generate(prompts, max(wants))
            done += [Done(row[:m], times[0]) for row, m in zip(rows, wants, strict=True)]
            tick(len(prompts))
        return done

    def stream(self, prompt: list[int], n: int) -> list[float]:
        return self._generate([prompt], n)[1]


class LlamaCppRunner:
    def __init__(self, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        from llmos.models.registry import resolve

        self.llm = Llama(
            model_path=str(resolve(MODEL)),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=512,
            verbose=False,
        )

    def _generate(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        self.llm.reset()  # no prefix reuse from the previous request: each starts cold
        tokens: list[int] = []
        times: list[float] = []
        for tok in self.llm.generate(
            prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        ):
            tokens.append(tok)
            times.append(time.monotonic())
            if len(tokens) == n:
                break
        return tokens, times

    def workload(self, w: Workload, tick: Callable[[int], None]) -> list[Done]:
        done: list[Done] = []
        for prompt, m in zip(w.prompts, w.max_tokens, strict=True):
            tokens, times = self._generate(prompt, m)
            done.append(Done(tokens, times[0]))
            tick(1)
        return done

    def stream(self, prompt: list[int], n: int) -> list[float]:
        return self._generate(prompt, n)[1]


def make_runner(engine: str, spec: dict[str, Any]) -> Runner:
    threads = spec["threads"]
    if engine == "llmos":
        return LlmosRunner(threads)
    if engine == "hf":
        return HFRunner(threads, spec["hf_batch"])
    if engine == "llamacpp":
        longest = max(
            len(p) + m
            for p, m in zip(
                spec["workload"]["prompts"], spec["workload"]["max_tokens"], strict=True
            )
        )
        return LlamaCppRunner(threads, -(-(longest + 16) // 256) * 256)
    raise ValueError(f"engine: unknown {engine!r}")


# -- worker modes ----------------------------------------------------------------------------
def bench_worker(engine: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up, run the workload, then single-stream decode; all in this process."""
    w = Workload(**spec["workload"])
    emit("phase", "load")
    t = time.monotonic()
    runner = make_runner(engine, spec)
    load_s = time.monotonic() - t
    rss_loaded = rss_bytes()
    emit("phase", "warmup")
    runner.stream(spec["chat_prompt"], 8)
    emit("phase", "workload")
    done_count = 0

    def tick(n: int) -> None:
        nonlocal done_count
        done_count += n
        emit("progress", f"{done_count} {len(w.prompts)}")

    stall0, cpu0, t0 = cpu_stall_us(), cpu_seconds(), time.monotonic()
    done = runner.workload(w, tick)
    wall = time.monotonic() - t0
    cpu = cpu_seconds() - cpu0
    out_tokens = sum(len(d.token_ids) for d in done)
    assert out_tokens == w.num_output_tokens, (out_tokens, w.num_output_tokens)
    result: dict[str, Any] = {
        "engine": engine,
        "load_s": load_s,
        "wall_s": wall,
        "output_tokens": out_tokens,
        "tok_s": out_tokens / wall,
        "ttft": ttft_summary([d.first_token - t0 for d in done]),
        "cpu_util": cpu / wall,
        "rss_loaded": rss_loaded,
        "loadavg": loadavg(),
        "cpu_stall": stall_share(stall0, wall),
        "token_ids": [d.token_ids for d in done],
    }
    if isinstance(runner, LlmosRunner):
        result["stats"] = runner.llm.engine.stats().as_dict()
        result["cached_tokens"] = runner.cached_tokens
    if isinstance(runner, HFRunner):
        b = runner.batch_size
        result["computed_tokens"] = sum(
            max(w.max_tokens[i : i + b]) * len(w.max_tokens[i : i + b])
            for i in range(0, len(w.max_tokens), b)
        )
    emit("phase", "single-stream")
    rates, ttfts = [], []
    stall0, t0 = cpu_stall_us(), time.monotonic()
    for _ in range(spec["stream_reps"]):
        t = time.monotonic()
        times = runner.stream(spec["chat_prompt"], spec["stream_tokens"])
        ttfts.append(times[0] - t)
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    result["stream"] = {
        "decode_tok_s": statistics.median(rates),
        "all": rates,
        "ttft": statistics.median(ttfts),
        "cpu_stall": stall_share(stall0, time.monotonic() - t0),
    }
    result["peak_rss"] = peak_rss_bytes()
    return result


def cold_worker(engine: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Import and load, then say `ready`; the parent times spawn → ready."""
    t = time.monotonic()
    if engine == "llmos":
        from llmos import LLM

        LLM(model=MODEL)
    elif engine == "hf":
        make_runner("hf", spec)
    else:
        make_runner("llamacpp", spec)
    in_process = time.monotonic() - t
    emit("ready")
    return {"engine": engine, "in_process_s": in_process}


def worker_main(mode: str, engine: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    fn = bench_worker if mode == "bench" else cold_worker
    emit("result", fn(engine, spec))


# -- the parent ------------------------------------------------------------------------------
def run_bench(
    engine: str, spec_path: Path, progress: Progress, task: TaskID, total: int
) -> dict[str, Any]:
    def on_line(line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "phase":
            progress.update(task, description=f"{LABELS[engine]}: {rest}")
        elif kind == "progress":
            progress.update(task, completed=int(rest.split()[0]), total=total)

    return run_worker(
        [__file__, "--worker", "bench", "--engine", engine, "--spec", str(spec_path)], on_line
    )


def run_cold(engine: str, spec_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    ready: list[float] = []
    t0 = time.monotonic()
    result = run_worker(
        [__file__, "--worker", "cold", "--engine", engine, "--spec", str(spec_path)],
        lambda line: ready.append(time.monotonic()) if line == "ready" else None,
        env=env,
    )
    result["spawn_to_ready"] = (ready[0] if ready else time.monotonic()) - t0
    return result


def agreement(results: dict[str, dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """Per engine: requests with outputs identical to llmos's, and the mean shared prefix."""
    base = results.get("llmos")
    out: dict[str, tuple[int, float]] = {}
    if base is None:
        return out
    for name, r in results.items():
        if name == "llmos":
            continue
        pairs = list(zip(base["token_ids"], r["token_ids"], strict=True))
        same = sum(a == b for a, b in pairs)
        prefix = statistics.fmean(common_prefix(a, b) / len(a) for a, b in pairs)
        out[name] = (same, prefix)
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}×" if base else "-"


def report(
    info: dict[str, Any],
) -> tuple[list[tuple[str, list[str], list[list[str]]]], list[str], str]:
    """The tables (title, header, rows), the floor verdicts, and the whole as markdown."""
    results: dict[str, dict[str, Any]] = info["results"]
    base = results.get("llmos")
    agree = agreement(results)
    head = [
        "engine",
        "output tok/s",
        "llmos ×",
        "wall s",
        "TTFT mean s",
        "TTFT p50 s",
        "peak RSS MiB",
        "cores used",
        "tok per CPU-s",
        "CPU stall",
        "same tokens as llmos",
    ]
    rows = []
    for name, r in results.items():
        same = agree.get(name)
        stall = r.get("cpu_stall")
        rows.append(
            [
                LABELS[name],
                f"{r['tok_s']:.1f}",
                ratio(base["tok_s"], r["tok_s"]) if base else "-",
                f"{r['wall_s']:.1f}",
                f"{r['ttft']['mean']:.2f}",
                f"{r['ttft']['p50']:.2f}",
                f"{r['peak_rss'] / 2**20:,.0f}",
                f"{r['cpu_util']:.2f}",
                f"{r['tok_s'] / r['cpu_util']:.1f}",
                pct(stall),
                "-" if same is None else f"{same[0]}/{len(r['token_ids'])} ({same[1]:.0%})",
            ]
        )
    shead = ["engine", "decode tok/s", "llmos ×", "best run tok/s", "TTFT ms", "CPU stall"]
    srows = [
        [
            LABELS[name],
            f"{r['stream']['decode_tok_s']:.1f}",
            ratio(base["stream"]["decode_tok_s"], r["stream"]["decode_tok_s"]) if base else "-",
            f"{max(r['stream']['all']):.1f}",
            f"{r['stream']['ttft'] * 1000:.0f}",
            pct(r["stream"].get("cpu_stall")),
        ]
        for name, r in results.items()
    ]
    chead = ["cold start", "fresh process → ready, s", "import + load in process, s"]
    crows = [
        [label, f"{c['spawn_to_ready']:.2f}", f"{c['in_process_s']:.2f}"]
        for label, c in info["cold"].items()
    ]

    floors: list[str] = []
    hf = results.get("hf")
    if base and hf:
        x = base["tok_s"] / hf["tok_s"]
        floors.append(
            f"{'PASS' if x >= 2 else 'FAIL'}: llmos workload throughput is {x:.2f}× HF's (floor 2×)"
        )
        y = base["stream"]["decode_tok_s"] / hf["stream"]["decode_tok_s"]
        floors.append(
            f"{'PASS' if y >= 1 else 'FAIL'}: llmos single-stream decode is {y:.2f}× "
            "HF's (floor 1×)"
        )
    warm = info["cold"].get("llmos (model cache warm)")
    if warm:
        t = warm["spawn_to_ready"]
        floors.append(
            f"{'PASS' if t < 5 else 'FAIL'}: llmos cold start is {t:.2f} s from a "
            "fresh process with the model cache warm (floor < 5 s)"
        )

    m, w, v = info["machine"], info["workload"], info["versions"]
    legend = (
        "llmos × = how many times llmos's figure this engine's is (higher is better for llmos). "
        "Cores used = the worker's CPU time ÷ wall time during the workload (at most "
        f"{info['threads']}); tok per CPU-s = output tokens ÷ that CPU time. CPU stall = the "
        "share of that time in which some task on the machine waited for a CPU (Linux PSI): "
        "near 0 % means the engine had the cores to itself, and figures taken at a high stall "
        "understate it (most for engines whose threads spin at barriers). Same tokens as "
        "llmos = "
        "requests whose greedy output is identical to llmos's (mean shared-prefix share). "
        "Peak RSS covers the whole worker: load, workload and single stream."
    )
    text = [
        f"Command: `{info['command']}` ({info['date']}).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"torch {v.get('torch', '-')}, transformers {v.get('transformers', '-')}, "
        f"llama-cpp-python {v.get('llama_cpp', '-')}; {info['threads']} threads per engine. "
        f"The cores are shared with teammates: 1-min load average {info['loadavg_start']:.2f} "
        f"at the start, {info['loadavg_end']:.2f} at the end.",
        "",
        f"Workload: {w['num_prompts']} prompts of {w['min_prompt']}–{w['max_prompt']} tokens "
        f"({w['prompt_tokens']:,} in all), max_tokens {w['min_out']}–{w['max_out']} "
        f"({w['output_tokens']:,} output tokens in all), greedy, EOS ignored, seed {w['seed']}. "
        "All requests arrive at t0, so TTFT includes queueing for engines that serve requests "
        "in turn. llmos batches all of them continuously; HF runs static batches of "
        f"{info['hf_batch']} in arrival order, each to its longest max_tokens, and counts only "
        "each request's own max_tokens as output"
        + (f" (it computed {hf['computed_tokens']:,} tokens for them)" if hf else "")
        + "; llama.cpp serves them one after another"
        + (
            f". llmos found {base['cached_tokens']:,} prompt tokens in its prefix cache "
            "(prompts that start with the same sentence)"
            if base and "cached_tokens" in base
            else ""
        )
        + ".",
        "",
        md_table(head, rows),
        "",
        legend,
        "",
        f"Single stream: {info['stream_tokens']} tokens after a short chat prompt; decode rate "
        "after the first token, "
        + ("one run." if info["stream_reps"] == 1 else f"median of {info['stream_reps']} runs."),
        "",
        md_table(shead, srows),
        "",
        md_table(chead, crows),
        "",
        f"Cold starts ran with {pct(info.get('cold_stall'))} CPU stall; the llmos cache miss "
        "points `LLMOS_CACHE_DIR` at a fresh folder, and the warm figure is the best of the "
        "starts after it.",
        "",
        "Floors (issue 2):",
        "",
        *[f"- {f}" for f in floors],
    ]
    if info["notes"]:
        text += ["", *[f"Note: {n}" for n in info["notes"]]]
    tables = [
        ("Workload", head, rows),
        ("Single stream", shead, srows),
        ("Cold start", chead, crows),
    ]
    return [t for t in tables if t[2]], floors, "\n".join(text)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for mod, dist in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("llama_cpp", "llama-cpp-python"),
    ):
        try:
            out[mod] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def prepare(
    spec_path: Path,
    *,
    prompts: int,
    seed: int,
    threads: int,
    hf_batch: int,
    stream_tokens: int,
    reps: int,
) -> dict[str, Any]:
    """Build the workload with the llmos tokenizer and write the workers' spec file."""
    from llmos.models.loader import load_checkpoint
    from llmos.models.registry import resolve

    tokenizer = load_checkpoint(resolve(MODEL)).tokenizer
    w = build_workload(tokenizer, prompts, seed)
    spec_path.write_text(
        json.dumps(
            {
                "workload": w.to_json(),
                "threads": threads,
                "hf_batch": hf_batch,
                "stream_tokens": stream_tokens,
                "stream_reps": reps,
                "chat_prompt": tokenizer.encode_chat(CHAT, add_generation_prompt=True),
            }
        )
    )
    return {
        "command": " ".join(["python benchmarks/engine.py", *_run_options(sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": versions(),
        "threads": threads,
        "hf_batch": hf_batch,
        "stream_tokens": stream_tokens,
        "stream_reps": reps,
        "loadavg_start": loadavg(),
        "spec": str(spec_path),
        "workload": {
            "num_prompts": prompts,
            "min_prompt": min(map(len, w.prompts)),
            "max_prompt": max(map(len, w.prompts)),
            "prompt_tokens": w.num_prompt_tokens,
            "min_out": min(w.max_tokens),
            "max_out": max(w.max_tokens),
            "output_tokens": w.num_output_tokens,
            "seed": seed,
        },
        "results": {},
        "cold": {},
    }


def _run_options(argv: list[str]) -> list[str]:
    """The options that shape a run, without where its results were written."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--record"):
            skip = True
        elif not arg.startswith(("--json=", "--record=")):
            out.append(arg)
    return out


def run_all(
    info: dict[str, Any],
    engines: list[str],
    tmp: Path,
    wait_quiet_s: float,
    cold_runs: int,
    save: Callable[[], None],
) -> None:
    """Each engine's worker in turn, then the cold starts; results go into `info`, and
    `save` runs after each, so a long run that is cut short keeps what it measured."""
    spec_path = Path(info["spec"])
    total = info["workload"]["num_prompts"]
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for name in engines:
            task = progress.add_task(f"{LABELS[name]}: waiting for quiet CPUs", total=total)
            if wait_quiet_s > 0:
                wait_quiet(wait_quiet_s)
            try:
                info["results"][name] = run_bench(name, spec_path, progress, task, total)
            except WorkerError as exc:
                info["notes"].append(f"{LABELS[name]} failed: {exc}")
                console.print(f"[red]{LABELS[name]} failed[/]: {exc}")
            progress.update(task, description=f"{LABELS[name]}: done")
            save()
        if not cold_runs:
            return
        task = progress.add_task("cold starts", total=None)
        if wait_quiet_s > 0:
            wait_quiet(wait_quiet_s)
        stall0, t0 = cpu_stall_us(), time.monotonic()
        # A fresh cache folder: the first llmos start misses it, the next ones find it.
        env = {**os.environ, "LLMOS_CACHE_DIR": str(tmp / "llmos-cache")}
        cold = info["cold"]
        cold["llmos (model cache miss)"] = run_cold("llmos", spec_path, env)
        runs = [run_cold("llmos", spec_path, env) for _ in range(cold_runs)]
        cold["llmos (model cache warm)"] = min(runs, key=lambda r: r["spawn_to_ready"])
        for name in engines[1:]:
            try:
                cold[LABELS[name]] = run_cold(name, spec_path)
            except WorkerError as exc:
                info["notes"].append(f"{LABELS[name]} cold start failed: {exc}")
        info["cold_stall"] = stall_share(stall0, time.monotonic() - t0)
        progress.update(task, total=1, completed=1, description="cold starts: done")


def main(
    prompts: Annotated[int, typer.Option(help="Requests in the workload.")] = 64,
    quick: Annotated[
        bool,
        typer.Option(
            help="At most 16 prompts, one single-stream run, one cold start each: a smoke run."
        ),
    ] = False,
    skip_hf: Annotated[bool, typer.Option(help="Leave out HF transformers.")] = False,
    skip_llamacpp: Annotated[bool, typer.Option(help="Leave out llama.cpp.")] = False,
    skip_cold: Annotated[bool, typer.Option(help="Leave out the cold starts.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the workload.")] = 0,
    threads: Annotated[int, typer.Option(help="Threads for every engine.")] = 2,
    hf_batch: Annotated[int, typer.Option(help="HF static batch size.")] = 8,
    stream_tokens: Annotated[int, typer.Option(help="Tokens in the single-stream run.")] = 128,
    wait_quiet_s: Annotated[
        float,
        typer.Option(
            "--wait-quiet",
            help="Before each engine, wait up to this many seconds for the other "
            "processes on the machine to leave the CPUs (stall under 10 %).",
        ),
    ] = 120.0,
    record: Annotated[
        Path | None,
        typer.Option(help="Write the results as the engine section of this markdown file."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write raw results here.")] = None,
    worker: Annotated[str | None, typer.Option(hidden=True)] = None,
    engine: Annotated[str, typer.Option(hidden=True)] = "llmos",
    spec: Annotated[Path | None, typer.Option(hidden=True)] = None,
) -> None:
    """Benchmark llmos against HF transformers and llama.cpp on the same workload."""
    if worker is not None:
        assert spec is not None
        worker_main(worker, engine, spec)
        return
    if quick:
        prompts = min(prompts, 16)
    engines = [
        e
        for e in ENGINES
        if not (e == "hf" and skip_hf) and not (e == "llamacpp" and skip_llamacpp)
    ]
    notes: list[str] = []
    if "llamacpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        engines.remove("llamacpp")
        notes.append("llama.cpp skipped: llama_cpp is not importable (run `make bench-setup`).")
    tmp = Path(tempfile.mkdtemp(prefix="llmos-bench-"))
    info = prepare(
        tmp / "spec.json",
        prompts=prompts,
        seed=seed,
        threads=threads,
        hf_batch=hf_batch,
        stream_tokens=stream_tokens,
        reps=1 if quick else 3,
    )
    info["notes"] = notes
    console.print(
        f"[bold]workload[/]: {prompts} prompts, {info['workload']['prompt_tokens']:,} "
        f"prompt tokens, {info['workload']['output_tokens']:,} output tokens; engines: "
        f"{', '.join(engines)}; load average {info['loadavg_start']:.2f}"
    )

    def save() -> None:
        if json_out is not None:
            json_out.write_text(json.dumps(info, indent=1))

    run_all(
        info, engines, tmp, wait_quiet_s, cold_runs=0 if skip_cold else 1 if quick else 2, save=save
    )
    info["loadavg_end"] = loadavg()
    tables, floors, markdown = report(info)
    out = Console(width=None if sys.stdout.isatty() else 150)
    for title, head, rows in tables:
        table = Table(title=title)
        for col in head:
            table.add_column(col, justify="left" if col in (head[0],) else "right")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    if "hf" in info["results"]:
        out.print(
            f"HF runs static batches of {hf_batch}, each to the batch's longest max_tokens; "
            "only each request's own max_tokens count as output tokens."
        )
    for f in floors:
        out.print(("[green]" if f.startswith("PASS") else "[red]") + f + "[/]")
    for n in info["notes"]:
        out.print(f"[yellow]note[/]: {n}")
    out.print(
        f"load average (1 min): {info['loadavg_start']:.2f} at start, "
        f"{info['loadavg_end']:.2f} at end"
    )
    if record is not None:
        replace_section(record, SECTION, markdown)
        out.print(f"wrote the engine section of {record}")
    save()


if __name__ == "__main__":
    typer.run(main)
