"""GGUF files → config, fp32 torch tensors (HF names and layout) and tokenizer metadata.

The `gguf` package does the reading and the dequantizing. llama.cpp's converter permutes the
rows of Q and K for its interleaved RoPE; we undo that so GGUF and safetensors checkpoints share
one model code path (HF's rotate-half RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from llmos.models.config import ModelConfig

SUPPORTED_TYPES = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q6_K,
}
LLAMA_ARCHS = {"llama", "mistral", "qwen2"}

# GGUF tensor name (after "blk.N.") → HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}


@dataclass(slots=True)
class GGUFCheckpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    metadata: dict[str, Any]  # every scalar / string / list field, by GGUF key


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def _config_from_metadata(meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in LLAMA_ARCHS:
        raise ValueError(
            f"general.architecture: {arch!r} is not a Llama-family model "
            f"(supported: {', '.join(sorted(LLAMA_ARCHS))})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata: {arch}.{key} is missing")
        return value

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    embed = weights["model.embed_tokens.weight"]
    return ModelConfig(
        vocab_size=int(meta.get(f"{arch}.vocab_size") or embed.shape[0]),
        hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="lm_head.weight" not in weights,
        architecture=arch,
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved → rotate-half RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(
            f"tensor {tensor.name}: quantization {qtype.name} is not supported "
            f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
        )
    if qtype == GGMLQuantizationType.F32:
        return np.asarray(tensor.data)
    if qtype == GGMLQuantizationType.F16:
        return np.asarray(tensor.data).astype(np.float32)
    return dequantize(tensor.data, qtype)


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    reader = GGUFReader(str(path))
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    heads = int(meta.get(f"{arch}.attention.head_count", 0))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name, rest = tensor.name, ""
        if name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_NAMES:
                continue
            hf_name = f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
        elif name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            continue
        array = _tensor_to_numpy(tensor)
        if arch == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
            array = _unpermute(array, heads if rest == "attn_q.weight" else kv_heads)
        weights[hf_name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    config = _config_from_metadata(meta, weights)
    if "rope_freqs" in weights:  # llama3-style per-dimension rope factors
        config.extra["rope_freqs"] = weights.pop("rope_freqs").tolist()
    return GGUFCheckpoint(config=config, weights=weights, metadata=meta)
