"""Agents on one engine: 16 processes × 6 tool steps, with KV retention on and off, and the same
programs through `openai_http` against llama-cpp-python's server (how local agents run today)
and llama.cpp's own llama-server (parallel slots, prompt cache on).

    .venv/bin/python benchmarks/agents.py [--agents 16] [--steps 6] [--tool-seconds 0.2]
                                          [--skip-llamacpp] [--record BENCHMARKS.md]

Every agent runs the same program: look up six keys with a `lookup` tool (each call waits
`--tool-seconds`, as a real tool would, then returns a ~70-token passage), then answer in one
sentence. Its tool calls are forced (`tool_choice` names the tool for the first six turns, then
is "none" for the answer), so every configuration makes the same number of model calls.
Reported: prompt tokens, how many were served from the KV cache, how many had to be prefilled,
and the makespan (first spawn to last process done).

- llmos, retention on: the engine pins a waiting process's blocks (`retain`), so its next turn
  prefills only the new tokens (the tool result and the next header).
- llmos, retention off: `enable_prefix_caching=False`; every turn prefills its whole prompt.
- llama-cpp-python: one request at a time; it reuses the longest prefix shared with the
  request before it, which, with 16 agents taking turns, is mostly the system prompt. Its tool
  calls are forced by a GBNF grammar sent with each request; its prefilled tokens are read from
  its own log ("N prefix-match hit, remaining M prompt tokens to eval").
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CORPUS,
    loadavg,
    machine,
    md_table,
    replace_section,
    wait_quiet,
    wait_until_serving,
)

from llmos.backends.base import ChatRequest  # noqa: E402
from llmos.kernel import Kernel, Program, Status, tool  # noqa: E402

SECTION = "## Agents (benchmarks/agents.py)"
TOOL_SECONDS = [0.2]
SYSTEM = (
    "You are a research agent. The user gives you keys. Look up each key with the lookup "
    "tool, one call per key, in the order given. After the last lookup, answer with one "
    "sentence that says what the passages were about."
)


@tool(read_only=True)
def lookup(key: str) -> str:
    """Look a key up in the archive and return its passage.

    Args:
        key: The key to look up, e.g. "k3-1".
    """
    time.sleep(TOOL_SECONDS[0])
    n = int(hashlib.sha256(key.encode()).hexdigest(), 16)
    sentences = re.split(r"(?<=[.!?])\s+", CORPUS[n % len(CORPUS)])
    head, _, page = key.rpartition("-")
    after = f" Next key: {head}-{int(page) + 1}." if page.isdigit() else ""
    return " ".join(sentences[:3]) + after


def program(steps: int) -> Program:
    return Program(
        name="researcher",
        version="1",
        system_prompt=SYSTEM,
        tools=[lookup],
        tool_choice=["lookup"] * steps + ["none"],
        limits={
            "max_steps": steps + 1,
            "max_seconds": 3600,
            "stuck_after": steps + 1,
        },  # measure the cache, not the model
        sampling={"temperature": 0.0, "max_tokens": 40},
    )


def task(i: int, steps: int) -> str:
    keys = ", ".join(f"k{i}-{j}" for j in range(1, steps + 1))
    return f"Agent {i}. Keys: {keys}."


def run_agents(kernel: Kernel, agents: int, steps: int) -> dict[str, Any]:
    t0 = time.monotonic()
    pids = [
        kernel.spawn(program(steps), task(i, steps), user=f"user{i % 4}") for i in range(agents)
    ]
    procs = [kernel.wait(pid) for pid in pids]
    makespan = time.monotonic() - t0
    u = [p.usage for p in procs]
    prompt = sum(x.prompt_tokens for x in u)
    cached = sum(x.cached_tokens for x in u)
    tool_steps = sum(sum(1 for s in p.steps if s.kind == "tool_result") for p in procs)
    return {
        "agents": agents,
        "done": sum(p.status is Status.DONE for p in procs),
        "turns": sum(p.num_turns for p in procs),
        "tool_steps": tool_steps,
        "prompt": prompt,
        "cached": cached,
        "prefilled": prompt - cached,
        "completion": sum(x.completion_tokens for x in u),
        "makespan": makespan,
        "engine_seconds": sum(x.engine_seconds for x in u),
    }


def run_local(agents: int, steps: int, caching: bool) -> dict[str, Any]:
    from llmos.backends.local import LocalBackend

    backend = LocalBackend(enable_prefix_caching=caching, kv_cache_memory="1GiB")
    with tempfile.TemporaryDirectory() as d, Kernel(backend=backend, db=Path(d) / "k.db") as k:
        run_agents(k, 1, 1)  # warm-up: the grammar compiler, the allocator
        return run_agents(k, agents, steps)


# -- llama-cpp-python ------------------------------------------------------------------------
def gbnf_call(name: str) -> str:
    """A GBNF grammar for exactly one `{"name": NAME, "arguments": {"key": "..."}}` call."""
    head = '{"name": "' + name + '", "arguments": {"key": "'
    quoted = head.replace("\\", "\\\\").replace('"', '\\"')
    return f'root ::= "{quoted}" [a-zA-Z0-9_-]+ "\\"}}}}"'


def grammar_for(request: ChatRequest) -> dict[str, Any]:
    choice = request.tool_choice
    if isinstance(choice, dict):
        return {"grammar": gbnf_call(choice["function"]["name"])}
    return {}


def run_llamacpp(agents: int, steps: int, threads: int) -> dict[str, Any]:
    from serve import free_port  # the serving benchmark's helper

    from llmos.backends.openai_http import OpenAIHTTPBackend
    from llmos.models.registry import resolve

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    args = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(resolve("smollm2-135m")),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        "4096",
        "--interrupt_requests",
        "False",
        "--verbose",
        "True",
    ]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(f"{url}/models", proc, 300, lambda: Path(log.name).read_text()[-800:])
        backend = OpenAIHTTPBackend(
            url, "smollm2-135m", native_tools=False, extra_body=grammar_for, context_window=4096
        )
        with tempfile.TemporaryDirectory() as d, Kernel(backend=backend, db=Path(d) / "k.db") as k:
            run_agents(k, 1, 1)
            start = len(Path(log.name).read_text())
            result = run_agents(k, agents, steps)
    finally:
        proc.terminate()
        proc.wait(30)
    text = Path(log.name).read_text()[start:]
    os.unlink(log.name)
    # llama-cpp-python logs each request's reuse: "N prefix-match hit, remaining M prompt tokens"
    reuse = re.findall(r"(\d+) prefix-match hit, remaining (\d+) prompt tokens to eval", text)
    result["cached"] = sum(int(hit) for hit, _ in reuse)
    result["prefilled"] = sum(int(rest) for _, rest in reuse)
    return result


def run_llama_server(agents: int, steps: int, threads: int, slots: int) -> dict[str, Any]:
    """The same programs through `openai_http` against llama.cpp's own `llama-server`
    (`make bench-setup`): `slots` parallel slots with continuous batching, its prompt cache on
    (`cache_prompt`, a slot reuses the prefix it last held), tool calls forced by the same
    GBNF grammar. Cached tokens are what its responses report (`prompt_tokens_details`)."""
    from serve import LLAMA_SERVER, free_port, llama_server_args

    from llmos.backends.openai_http import OpenAIHTTPBackend
    from llmos.models.registry import resolve

    port = free_port()
    args = llama_server_args(LLAMA_SERVER, port, resolve("smollm2-135m"), slots, threads)
    args[args.index("--ctx-size") + 1] = str(slots * 4096)  # 4096 per slot, as llmos's window
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"

    def body(request: ChatRequest) -> dict[str, Any]:
        return {**grammar_for(request), "cache_prompt": True}

    try:
        wait_until_serving(f"{url}/models", proc, 300, lambda: proc.stderr.read()[-800:])  # type: ignore[union-attr]
        backend = OpenAIHTTPBackend(
            url, "smollm2-135m", native_tools=False, extra_body=body, context_window=4096
        )
        with tempfile.TemporaryDirectory() as d, Kernel(backend=backend, db=Path(d) / "k.db") as k:
            run_agents(k, 1, 1)
            return run_agents(k, agents, steps)
    finally:
        proc.terminate()
        proc.wait(30)


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r['done']}/{r['agents']}",
                str(r["turns"]),
                str(r["tool_steps"]),
                f"{r['prompt']:,}",
                f"{r['cached']:,} ({r['cached'] / r['prompt']:.0%})",
                f"{r['prefilled']:,}",
                f"{r['completion']:,}",
                f"{r['makespan']:.1f}",
            ]
        )
    return md_table(
        [
            "configuration",
            "done",
            "model turns",
            "tool steps",
            "prompt tokens",
            "cached",
            "prefilled",
            "completion",
            "makespan s",
        ],
        rows,
    )


def main(
    agents: Annotated[int, typer.Option("--agents")] = 16,
    steps: Annotated[int, typer.Option("--steps")] = 6,
    tool_seconds: Annotated[float, typer.Option("--tool-seconds")] = 0.2,
    threads: Annotated[int, typer.Option("--llamacpp-threads")] = 2,
    skip_llamacpp: Annotated[bool, typer.Option("--skip-llamacpp")] = False,
    quiet_wait: Annotated[
        float,
        typer.Option("--quiet-wait", help="Seconds to wait for other work on the machine to end."),
    ] = 0,
    record: Annotated[Path | None, typer.Option("--record")] = None,
) -> None:
    TOOL_SECONDS[0] = tool_seconds
    if quiet_wait:
        wait_quiet(quiet_wait)
    load_start = loadavg()
    results: dict[str, dict[str, Any]] = {}
    for name, caching in (
        ("llmos local, retention on", True),
        ("llmos local, retention off", False),
    ):
        results[name] = run_local(agents, steps, caching)
        print(name, results[name], flush=True)
    have_llamacpp = not skip_llamacpp and _importable("llama_cpp.server")
    if have_llamacpp:
        name = f"llama-cpp-python server via openai_http ({threads} threads)"
        results[name] = run_llamacpp(agents, steps, threads)
        print(name, results[name], flush=True)
    from serve import LLAMA_SERVER

    have_server = not skip_llamacpp and LLAMA_SERVER.exists()
    server_name = f"llama-server -np {agents} via openai_http ({threads} threads)"
    if have_server:
        results[server_name] = run_llama_server(agents, steps, threads, agents)
        print(server_name, results[server_name], flush=True)
    body = table(results)
    on, off = results["llmos local, retention on"], results["llmos local, retention off"]
    notes = [
        f"{agents} agents × {steps} forced tool steps + 1 answer turn, greedy, "
        f"tool latency {tool_seconds:g} s; machine: {machine().get('cpu', '?')}, "
        f"{os.cpu_count()} cores, load average {load_start:.1f} at the start and "
        f"{loadavg():.1f} at the end, {time.strftime('%Y-%m-%d')}. The answer turn has "
        "no tools, so its system prompt differs from the tool turns' and it prefills from "
        "there on (in every configuration).",
        f"Retention cuts prefilled tokens {off['prefilled'] / max(1, on['prefilled']):.1f}× "
        f"and makespan {off['makespan'] / on['makespan']:.2f}×.",
    ]
    if have_llamacpp:
        lc = results[next(k for k in results if k.startswith("llama"))]
        notes.append(
            f"Against llama-cpp-python (one request at a time, prefix reuse only with "
            f"the request before): {lc['prefilled'] / max(1, on['prefilled']):.1f}× "
            f"the prefilled tokens and {lc['makespan'] / on['makespan']:.2f}× the "
            "makespan of llmos with retention. Its tools go in the prompt (llmos's "
            "documented JSON format) with a GBNF grammar forcing each call, so its "
            "prompts differ slightly in length from llmos's."
        )
    else:
        notes.append("llama-cpp-python was not importable: its row is missing.")
    if have_server:
        ls = results[server_name]
        notes.append(
            f"Against llama.cpp's own llama-server ({agents} parallel slots, continuous "
            "batching, prompt cache on): "
            f"{ls['prefilled'] / max(1, on['prefilled']):.1f}× the prefilled tokens and "
            f"{ls['makespan'] / on['makespan']:.2f}× the makespan of llmos with retention "
            "(its cached tokens as its responses report them)."
        )
    else:
        notes.append("llama-server was not built (`make bench-setup`): its row is missing.")
    notes.append(
        "Retention pins each waiting process's blocks in the engine (released when the "
        "process ends, or oldest first under memory pressure), on top of the prefix "
        "cache's LRU."
    )
    markdown = body + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(markdown)
    if record is not None:
        replace_section(record, SECTION, markdown)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


if __name__ == "__main__":
    typer.run(main)
