"""`llmos chat`: an interactive chat in the terminal."""

from __future__ import annotations

import typer

from llmos.cli.options import DEVICE, KV_CACHE_MEMORY, MAX_MODEL_LEN, MODEL
from llmos.cli.streaming import err, load_engine, stream_to_stdout


def chat(
    system: str | None = typer.Option(None, "--system", "-s", help="A system prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.7, "--temperature", "-t"),
    seed: int | None = typer.Option(None, "--seed"),
    model: str = MODEL,
    max_model_len: int | None = MAX_MODEL_LEN,
    kv_cache_memory: str = KV_CACHE_MEMORY,
    device: str = DEVICE,
) -> None:
    """Chat with the model. An empty line or Ctrl-D ends the session; /reset starts over."""
    from llmos.engine.sampling import SamplingParams
    from llmos.errors import RequestError

    engine = load_engine(
        model, max_model_len=max_model_len, kv_cache_memory=kv_cache_memory, device=device
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err.print(f"[dim]{engine.model_name} — empty line or Ctrl-D to quit, /reset to start over[/]")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        ids = engine.tokenizer.encode_chat(messages)
        err.print("[bold]assistant>[/] ", end="")
        try:
            reply = stream_to_stdout(engine, ids, params)
        except RequestError as exc:  # e.g. the conversation outgrew the context
            err.print(f"[red]error:[/] {exc}")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def register(app: typer.Typer) -> None:
    app.command()(chat)
