"""`llmos serve`: the OpenAI-compatible server on one engine, stopped cleanly by SIGTERM."""

from __future__ import annotations

import json
import logging
import signal

import typer

from llmos.cli.options import DEVICE, KV_CACHE_MEMORY, MAX_MODEL_LEN, MODEL


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", "-p", help="Port (0 picks a free one)."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="LLMOS_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1.",
    ),
    max_waiting: int | None = typer.Option(
        256, "--max-waiting", help="Refuse (429) requests beyond this many waiting sequences."
    ),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Sequences in one batch."),
    max_body_size: str = typer.Option("4MiB", "--max-body-size", help="Request size limit."),
    grace: float = typer.Option(
        30.0,
        "--grace",
        help="Seconds SIGTERM takes at most to stop the server: requests in flight get all but "
        "the last ~2.5 s of it to finish, then end with a 503 error; new ones get 503 at once. "
        "A second SIGTERM stops at once.",
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="Torch CPU threads (default: one per core); the HTTP loop shares those cores.",
    ),
    deterministic: bool = typer.Option(
        False,
        "--deterministic",
        help="Batch-invariant kernels: a request's logits do not "
        "depend on what else is in the batch, its chunking, cache hits or preemption.",
    ),
    no_prefix_caching: bool = typer.Option(
        False, "--no-prefix-caching", help="Recompute shared prefixes."
    ),
    speculation: str | None = typer.Option(
        None,
        "--speculation",
        help="Speculative decoding: 'suffix' (SuffixDecoding) or 'ngram' (prompt lookup). "
        'Lossless; a request can turn it off with "speculation": false.',
    ),
    num_speculative_tokens: int = typer.Option(
        7, "--num-speculative-tokens", help="Most draft tokens verified per step."
    ),
    guards: str | None = typer.Option(
        None,
        "--guards",
        help="YAML file of guards (a list of guard objects, as the per-request 'guards' field) "
        "applied to every request: input, and output as it streams.",
    ),
    trim_history: bool = typer.Option(
        False,
        "--trim-history",
        help="Trim chat history that does not fit the context (old tool outputs, then the "
        "oldest messages; system prompt and newest message kept), reported in "
        "usage.context_trim. Off: such a request is a 400 context_length_exceeded.",
    ),
    strict_fields: bool = typer.Option(
        False,
        "--strict-fields",
        help="Refuse (400) a request with a field the server does not read, as OpenAI does; "
        "by default such fields are named in the x-llmos-ignored-fields header and the log.",
    ),
    responses_db: str | None = typer.Option(
        None,
        "--responses-db",
        help="SQLite file of stored /v1/responses (for previous_response_id), or ':memory:' "
        "to keep them until the server stops. Default: responses.sqlite in the llmos cache "
        "folder (LLMOS_CACHE_DIR; in memory when that is set empty).",
    ),
    api_keys: str | None = typer.Option(
        None,
        "--api-keys",
        help="YAML file of API keys, each to a user ('sk-...: alice') or to "
        "{user, admin: true}: a user sees and controls only their own processes and usage.",
    ),
    kernel_db: str | None = typer.Option(
        None,
        "--kernel-db",
        help="The kernel's SQLite file for /v1/processes (default: $LLMOS_DB or "
        "~/.local/share/llmos/llmos.db, as `llmos run`).",
    ),
    workspace_root: str | None = typer.Option(
        None,
        "--workspace-root",
        help="Processes' workspaces must lie under this folder "
        "(default: ~/.local/share/llmos/workspaces).",
    ),
    programs: str | None = typer.Option(
        None,
        "--programs",
        help="A folder of program files (.yaml/.py), spawnable by name (the file's stem) "
        "beside the built-in 'assistant'.",
    ),
    no_kernel: bool = typer.Option(
        False, "--no-kernel", help="Serve the model only: no /v1/processes, /v1/usage."
    ),
    otlp_endpoint: str | None = typer.Option(
        None,
        "--otlp-endpoint",
        help="Export OpenTelemetry traces over OTLP/HTTP to this collector (default: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT; unset: tracing off).",
    ),
    trace_content: bool = typer.Option(
        False,
        "--trace-content",
        help="Record prompts, replies, tool arguments and results on spans (default: their "
        "sha256; also $OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
    model: str = MODEL,
    max_model_len: int | None = MAX_MODEL_LEN,
    kv_cache_memory: str = KV_CACHE_MEMORY,
    device: str = DEVICE,
) -> None:
    """Serve MODEL with the OpenAI API at http://HOST:PORT/v1."""
    from llmos.cli.streaming import load_engine
    from llmos.engine.async_engine import AsyncEngine
    from llmos.engine.config import parse_bytes
    from llmos.errors import RequestError
    from llmos.server.app import create_app, server_state
    from llmos.server.guards import load_guards
    from llmos.server.launch import bind, make_server, url_of
    from llmos.server.response_store import ResponseStore
    from llmos.server.state import ServerConfig

    try:
        config = ServerConfig(
            api_key=api_key or None,
            max_waiting=max_waiting,
            max_body_bytes=parse_bytes(max_body_size, "--max-body-size"),
            strict_fields=strict_fields,
            trim_history=trim_history,
            responses_db=responses_db or default_responses_db(),
            guards=load_guards(guards) if guards else [],
        )
        ResponseStore(config.responses_db).close()  # a bad path fails before the model loads
        sock = bind(host, port)  # before loading the model: a busy port fails at once
    except RequestError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.secho(
            f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", fg="red", err=True
        )
        raise typer.Exit(2) from None
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    try:  # the kernel's flags are read before the model loads, as the others
        make_kernel = None if no_kernel else _host(kernel_db, workspace_root, api_keys, programs)
    except ValueError as exc:  # RequestError, ProgramError: names the flag
        sock.close()
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    try:  # built on the engine's own thread (see AsyncEngine)
        engine = AsyncEngine(
            lambda: load_engine(
                model,
                max_model_len=max_model_len,
                kv_cache_memory=kv_cache_memory,
                device=device,
                max_num_seqs=max_num_seqs,
                deterministic=deterministic,
                enable_prefix_caching=not no_prefix_caching,
                speculation=speculation,
                num_speculative_tokens=num_speculative_tokens,
            )
        )
    except ValueError as exc:  # RequestError, ModelNotFoundError, a bad engine setting
        sock.close()
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    kernel = None if make_kernel is None else make_kernel(engine)
    from llmos.server import tracing

    try:
        tracing.setup(otlp_endpoint, trace_content or None)
    except RuntimeError as exc:  # the OTLP exporter is not installed
        engine.shutdown()
        sock.close()
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    app = create_app(engine, config, kernel)
    app.state.eval_reports = _eval_reports(kernel)
    verbose = verbose or logging.getLogger().isEnabledFor(logging.INFO)
    server = make_server(app, grace=grace, verbose=verbose)
    typer.echo(banner(url_of(sock), server_state(app).model_name, api_key is not None))
    # uvicorn shuts down gracefully on these, then re-raises them; once handled, exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    tracing.trace.shutdown()  # flush the spans still batched


def _host(db, workspace_root, api_keys, programs):  # noqa: ANN001, ANN202
    """What makes the kernel beside the engine (/v1/processes) once the engine is loaded; its
    users, programs and workspace root are read now, so a bad flag fails at once."""
    from pathlib import Path

    from llmos.cli.kernel_view import db_path
    from llmos.cli.run import default_program
    from llmos.errors import RequestError
    from llmos.server.processes_host import ProcessHost, programs_in
    from llmos.server.users import Users

    users = Users.load(api_keys)
    registered = {"assistant": default_program, **(programs_in(programs) if programs else {})}
    if workspace_root is not None and not Path(workspace_root).is_dir():
        raise RequestError(f"--workspace-root: {workspace_root!r} is not a folder")
    return lambda engine: ProcessHost.on_engine(
        engine, db_path(db), workspace_root=workspace_root, users=users, programs=registered
    )


def _eval_reports(kernel):  # noqa: ANN001, ANN202
    """The console's eval reports, from the kernel DB's eval history (None without one)."""
    if kernel is None:
        return None
    from llmos.cli.console_evals import EvalHistoryReports

    return EvalHistoryReports(kernel.kernel.store.path)


def default_responses_db() -> str:
    """Where stored responses live by default: kept across restarts, as OpenAI keeps them,
    unless caching is off."""
    from llmos.models.cache import cache_dir

    folder = cache_dir()
    return ":memory:" if folder is None else str(folder / "responses.sqlite")


def banner(url: str, model: str, needs_key: bool) -> str:
    """Where the server is, with examples to paste."""
    url = url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
    auth = ' -H "Authorization: Bearer $LLMOS_API_KEY"' if needs_key else ""
    key = 'os.environ["LLMOS_API_KEY"]' if needs_key else '"none"'
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    return f"""llmos is serving {model} at {url}/v1

  curl {url}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{body}'

  import os
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key={key})
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)

The console: {url}/ (chat, processes, engine charts, usage, evals).
Also: {url}/v1/models, {url}/v1/processes, {url}/health, {url}/metrics.
Ctrl+C or SIGTERM stops it gracefully.
"""


def register(app: typer.Typer) -> None:
    app.command()(serve)
