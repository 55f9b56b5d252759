"""`EngineConfig`, the engine's settings checked where they are made, and `parse_bytes` for
the sizes they are given in."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmos.errors import RequestError
from llmos.models.quant import MODES as QUANT_MODES
from llmos.models.registry import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def parse_bytes(value: int | str, field: str = "kv_cache_memory") -> int:
    """`2147483648`, `"2GiB"`, `"512MB"` → bytes. Errors name `field`, the setting being read."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestError(f"{field}: expected a size like '2GiB', got {value!r}", param=field)
    m = _SIZE.match(value) if isinstance(value, str) else None
    if isinstance(value, str) and not m:
        raise RequestError(f"{field}: cannot read {value!r} as a size like '2GiB'", param=field)
    if m:
        unit = m.group(2).lower().rstrip("b").rstrip("i")
        value = int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))
    if value < 1:
        raise RequestError(f"{field}: a size must be at least 1 byte, got {value}", param=field)
    return value


@dataclass(slots=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    max_model_len: int | None = None  # default: the model's context length
    block_size: int = 16
    kv_cache_memory: int | str = "2GiB"  # KV cache size, unless num_kv_blocks is given
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int | None = None
    enable_prefix_caching: bool = True
    user_weights: dict[str, float] | None = None  # fair-share weights (default 1 each)
    device: str = "auto"  # "auto": CUDA when present, else CPU
    kv_cache_dtype: str = "float32"
    deterministic: bool = False
    # weight storage for small steps: "auto" (lossless 4/8-bit where a weight allows, see
    # models/quant.py), "q8", "q4" (lossy) or "fp32"
    quantization: str = "auto"
    seed: int = 0  # for requests without their own seed
    # speculative decoding (engine/spec.py): "suffix", "ngram" or None (off), and the most
    # draft tokens a sequence verifies per step (7: with its own row, 8 rows, which the native
    # row kernel serves in one pass over each weight group; 9 rows take two, BENCHMARKS.md)
    speculation: str | None = None
    num_speculative_tokens: int = 7

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in DTYPES:
            raise RequestError(
                f"kv_cache_dtype must be one of {sorted(DTYPES)}, got {self.kv_cache_dtype!r}",
                param="kv_cache_dtype",
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise RequestError(
                f"max_model_len must be at least 2, got {self.max_model_len}", param="max_model_len"
            )
        if self.quantization not in QUANT_MODES:
            raise RequestError(
                f"quantization must be one of {list(QUANT_MODES)}, got {self.quantization!r}",
                param="quantization",
            )
        if self.speculation not in (None, "suffix", "ngram"):
            raise RequestError(
                f"speculation must be 'suffix', 'ngram' or None, got {self.speculation!r}",
                param="speculation",
            )
        if not (
            isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 32
        ):
            raise RequestError(
                "num_speculative_tokens must be an integer in [1, 32], got "
                f"{self.num_speculative_tokens!r}",
                param="num_speculative_tokens",
            )
        if self.block_size < 1:
            raise RequestError(
                f"block_size must be at least 1, got {self.block_size}", param="block_size"
            )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
