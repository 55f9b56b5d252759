"""HF transformers as the oracle: the same GGUF file, read and run by code no one here wrote.

Loading the model through transformers takes ~20 s (it dequantizes in Python), so test modules
load it once, through a module-scoped fixture. The tokenizer is cheaper and shared per session.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.models.registry import resolve

MODEL = "smollm2-135m"
transformers = pytest.importorskip("transformers", reason="HF transformers is the test oracle")


def gguf_path() -> Path:
    return resolve(MODEL)


@functools.cache
def hf_tokenizer() -> Any:
    path = gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def hf_model() -> Any:
    """The GGUF dequantized to fp32 by transformers (needs `accelerate`)."""
    path = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def save_as_hf_folder(model: Any, folder: Path) -> None:
    """`save_pretrained` the model and tokenizer: config.json, *.safetensors, tokenizer files.

    transformers refuses to save a model loaded from GGUF ("quantized with gguf and is not
    serializable") although its weights are plain fp32 by then, so save a copy without the
    quantization config that shares the same tensors.
    """
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.save_pretrained(folder)
    hf_tokenizer().save_pretrained(folder)


@torch.inference_mode()
def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """Logits at every position: [T, vocab] fp32."""
    return model(torch.tensor([ids])).logits[0].float()
