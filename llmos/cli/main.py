"""The `llmos` command. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import logging
import os

import typer

from llmos.cli import approve, chat, eval, generate, ps, run, serve, top, usage

app = typer.Typer(
    name="llmos",
    help="An operating system for LLM programs.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs.")) -> None:
    level = logging.INFO if verbose else getattr(logging, os.environ.get("LLMOS_LOG", "WARNING"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):  # traces of `llmos run` and the rest go to the collector the environment names
        from llmos.kernel import trace

        trace.configure_from_env()


generate.register(app)
chat.register(app)
run.register(app)
ps.register(app)
top.register(app)
approve.register(app)
usage.register(app)
serve.register(app)
eval.register(app)
