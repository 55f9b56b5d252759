"""The Llama family (SmolLM2, Llama 3, Qwen2, Mistral) over a paged KV cache.

One flat batch of tokens per step: `[T]` ids from any number of sequences, each row with its
own position. Linear layers see `[T, hidden]`; attention splits rows per sequence through
`AttentionMetadata`. Q/K/V and gate/up projections are fused at load time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmos.models.attention import AttentionMetadata, paged_attention, write_kv
from llmos.models.config import ModelConfig, rope_inv_freq

# The two kernels a transform may swap (see batch_invariant.py); the model grows no flags.
LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
AttentionFn = Callable[..., torch.Tensor]
# ...and may serve all the layers of a step in one call (quant.py's native stack):
# (x, cos, sin, kv_caches, meta) -> x, or None where it does not serve the step
LayersFn = Callable[..., torch.Tensor | None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """cos, sin: [max_pos, head_dim] (halves repeated, for rotate-half RoPE)."""
    inv = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32)
    if "rope_freqs" in cfg.extra:  # GGUF llama3 files carry the factors as a tensor
        inv = inv / torch.tensor(cfg.extra["rope_freqs"], dtype=torch.float32)
    pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(pos, inv)  # [P, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.split = (q, kv, kv)
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.qkv = nn.Parameter(torch.empty(q + 2 * kv, cfg.hidden_size), requires_grad=False)
        self.qkv_bias: nn.Parameter | None = None
        self.o = nn.Parameter(torch.empty(cfg.hidden_size, q), requires_grad=False)
        self.gate_up = nn.Parameter(
            torch.empty(2 * cfg.intermediate_size, cfg.hidden_size), requires_grad=False
        )
        self.down = nn.Parameter(
            torch.empty(cfg.hidden_size, cfg.intermediate_size), requires_grad=False
        )
        self.linear: LinearFn = F.linear
        self.attention: AttentionFn = paged_attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cfg = self.cfg
        h = rms_norm(x, self.input_norm, cfg.rms_norm_eps)  # [T, hidden]
        q, k, v = self.linear(h, self.qkv, self.qkv_bias).split(self.split, dim=-1)
        q = apply_rope(q.view(-1, cfg.num_heads, cfg.head_dim), cos, sin)  # [T, H, D]
        k = apply_rope(k.view(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)  # [T, Hkv, D]
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        attn = self.attention(q, k, v, k_cache, v_cache, meta, cfg.head_dim**-0.5)
        x = x + self.linear(attn.flatten(1), self.o, None)
        h = rms_norm(x, self.post_norm, cfg.rms_norm_eps)
        gate, up = self.linear(h, self.gate_up, None).chunk(2, dim=-1)  # [T, I] each
        return x + self.linear(F.silu(gate) * up, self.down, None)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.lm_head: nn.Parameter | None = None  # None: tied to `embed`
        self.linear: LinearFn = F.linear
        self.run_layers: LayersFn | None = None
        self.register_buffer("cos", torch.empty(0), persistent=False)  # set in from_weights
        self.register_buffer("sin", torch.empty(0), persistent=False)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, w: dict[str, torch.Tensor]) -> LlamaModel:
        """Build from HF-named fp32 tensors (GGUF tensors are renamed to these at load)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.cos, model.sin = rope_tables(cfg)

        def p(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.contiguous(), requires_grad=False)

        model.embed = p(w["model.embed_tokens.weight"])
        model.norm = p(w["model.norm.weight"])
        if not cfg.tie_word_embeddings:
            model.lm_head = p(w["lm_head.weight"])
        for i, layer in enumerate(model.layers):
            pre = f"model.layers.{i}."
            layer.input_norm = p(w[pre + "input_layernorm.weight"])
            layer.post_norm = p(w[pre + "post_attention_layernorm.weight"])
            layer.qkv = p(torch.cat([w[pre + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
            if pre + "self_attn.q_proj.bias" in w:
                layer.qkv_bias = p(torch.cat([w[pre + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
            layer.o = p(w[pre + "self_attn.o_proj.weight"])
            layer.gate_up = p(
                torch.cat([w[pre + "mlp.gate_proj.weight"], w[pre + "mlp.up_proj.weight"]])
            )
            layer.down = p(w[pre + "mlp.down_proj.weight"])
        return model

    def layer_loop(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns logits [len(logits_rows), vocab] in fp32."""
        x = F.embedding(input_ids, self.embed)  # [T, hidden]
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D]
        out = None if self.run_layers is None else self.run_layers(x, cos, sin, kv_caches, meta)
        x = self.layer_loop(x, cos, sin, kv_caches, meta) if out is None else out
        x = rms_norm(x[logits_rows], self.norm, self.cfg.rms_norm_eps)
        head = self.embed if self.lm_head is None else self.lm_head
        return self.linear(x, head, None).float()
