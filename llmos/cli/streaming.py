"""Shared by `generate` and `chat`: load an engine with progress, stream one request."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from llmos.engine.llm_engine import LLMEngine
    from llmos.engine.sampling import SamplingParams

err = Console(stderr=True)


def load_engine(model: str, **options: Any) -> LLMEngine:
    with err.status(f"loading {model}…", spinner="dots"):
        from llmos.engine.llm_engine import LLMEngine

        return LLMEngine(model=model, **{k: v for k, v in options.items() if v is not None})


def stream_to_stdout(engine: LLMEngine, prompt: str | Sequence[int], params: SamplingParams) -> str:
    """Run one request to the end, writing its text to stdout as it is made."""
    engine.add_request("cli", prompt, params)
    shown = 0
    text = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
    except KeyboardInterrupt:
        engine.abort_request("cli")
    sys.stdout.write("\n")
    return text
