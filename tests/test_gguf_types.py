"""A tiny random Llama written as GGUF in every quantization `gguf` can write, loaded by llmos
and by HF transformers (the oracle): same logits. Checks the name mapping, the Q/K row
permutation, untied heads and each dequantization path without a big file."""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmos import LLM, SamplingParams
from llmos.models.registry import resolve

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF layout → llama.cpp's interleaved-RoPE layout, as convert_hf_to_gguf does."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@functools.cache
def vocab() -> tuple[list[str], list[int], list[str]]:
    """The real model's vocabulary, so the tiny model has a real tokenizer."""
    fields = gguf.GGUFReader(str(resolve("smollm2-135m"))).fields
    return tuple(
        fields[f"tokenizer.ggml.{k}"].contents()  # type: ignore[return-value]
        for k in ("tokens", "token_type", "merges")
    )


def write_tiny_gguf(path: Path, qtypes: dict[str, Q], untied: bool) -> None:
    tokens, token_types, merges = vocab()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def add(
        name: str, shape: tuple[int, ...], kind: str, scale: float = 0.08, heads: int | None = None
    ) -> None:
        arr = (rng.standard_normal(shape) * scale).astype(np.float32)
        if kind == "norm":
            arr = (1.0 + rng.standard_normal(shape) * 0.1).astype(np.float32)
        if heads is not None:
            arr = permute(arr, heads)
        qtype = qtypes.get(kind, Q.F32) if kind != "norm" else Q.F32
        if qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), HIDDEN), "embed", 0.5)
    if untied:
        add("output.weight", (len(tokens), HIDDEN), "head", 0.5)
    add("output_norm.weight", (HIDDEN,), "norm")
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), "norm")
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), "norm")
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), "attn", heads=HEADS)
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * hd, HIDDEN), "attn", heads=KV_HEADS)
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * hd, HIDDEN), "attn")
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), "attn")
        add(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN), "ffn")
        add(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN), "ffn")
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN), "ffn")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CASES = {
    "f32-tied": ({}, False),
    "f16-bf16-untied": ({"embed": Q.F16, "head": Q.BF16, "attn": Q.F16, "ffn": Q.BF16}, True),
    "q8_0": ({"embed": Q.Q8_0, "attn": Q.Q8_0, "ffn": Q.Q8_0}, False),
    "q4_0-q4_1-untied": ({"embed": Q.Q8_0, "head": Q.Q4_1, "attn": Q.Q4_0, "ffn": Q.Q4_1}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_gguf_matches_transformers(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("LLMOS_CACHE_DIR", str(tmp_path / "cache"))
    qtypes, untied = CASES[case]
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtypes, untied)
    llm = LLM(model=str(path), kv_cache_memory="16MiB")
    cfg = llm.engine.model_config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == (
        LAYERS,
        HEADS,
        KV_HEADS,
        HIDDEN,
    )
    assert cfg.tie_word_embeddings is not untied
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    ids = llm.tokenizer.encode("The tiny model reads a few words, then some more words.")
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)  # [T, V]
    out = llm.generate(
        [ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    )[0]
    # the first generated token's distribution is the prompt's last position
    top = dict(out.logprobs[0].top)
    for tok, lp in top.items():
        assert abs(lp - float(ref[-1, tok])) < 1e-3
    hf_greedy = hf.generate(
        torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False
    )[0, len(ids) :].tolist()
    assert out.token_ids == hf_greedy
    # loading again comes from the cache and gives the same result
    again = LLM(model=str(path), kv_cache_memory="16MiB").generate(
        [ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    )[0]
    assert again.token_ids == out.token_ids
