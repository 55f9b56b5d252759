"""Engine options shared by the commands that load a model."""

from __future__ import annotations

import typer

from llmos.models.registry import DEFAULT_MODEL

MODEL = typer.Option(
    DEFAULT_MODEL, "--model", "-m", help="A registered model name, a .gguf file, or a HF folder."
)
MAX_MODEL_LEN = typer.Option(None, "--max-model-len", help="Context length (default: the model's).")
KV_CACHE_MEMORY = typer.Option("2GiB", "--kv-cache-memory", help="KV cache size, e.g. 2GiB.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
