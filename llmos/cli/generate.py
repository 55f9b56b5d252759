"""`llmos generate "prompt"`: stream one completion to the terminal."""

from __future__ import annotations

import sys

import typer

from llmos.cli.options import DEVICE, KV_CACHE_MEMORY, MAX_MODEL_LEN, MODEL
from llmos.cli.streaming import load_engine, stream_to_stdout


def generate(
    prompt: str = typer.Argument(..., help="The prompt; '-' reads it from stdin."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None, "--seed"),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    chat_mode: bool = typer.Option(False, "--chat", help="Wrap the prompt in the chat template."),
    model: str = MODEL,
    max_model_len: int | None = MAX_MODEL_LEN,
    kv_cache_memory: str = KV_CACHE_MEMORY,
    device: str = DEVICE,
) -> None:
    """Print a completion of PROMPT, token by token."""
    from llmos.engine.sampling import SamplingParams
    from llmos.errors import RequestError

    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
        )
        engine = load_engine(
            model, max_model_len=max_model_len, kv_cache_memory=kv_cache_memory, device=device
        )
        ids = (
            engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            if chat_mode
            else prompt
        )
        stream_to_stdout(engine, ids, params)
    except RequestError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command()(generate)
