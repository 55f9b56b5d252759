"""Grouped-query attention over a paged KV cache.

The cache of one layer is two tensors `[num_blocks, block_size, n_kv_heads, head_dim]`. A
sequence owns a list of blocks (its block table); token `t` of it lives in slot
`block_table[t // block_size] * block_size + t % block_size`. The engine builds one
`AttentionMetadata` per step; every layer reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llmos.models.native import kernels


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of this chunk in the step's flat token batch
    length: int  # new tokens in this chunk
    context_len: int  # tokens the sequence holds after this step (cached + new)
    block_table: torch.Tensor  # [n_blocks] int64, enough blocks for context_len
    mask: torch.Tensor | None  # [length, context_len] bool, True = may attend; None if fresh

    @property
    def fresh(self) -> bool:
        """Nothing was cached before this chunk: it attends only to its own new keys."""
        return self.context_len == self.length


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    prefills: list[PrefillChunk]
    block_size: int
    decode_rows: torch.Tensor | None = None  # [Bd] rows of the flat batch with one new token
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks] int64
    decode_lens: torch.Tensor | None = None  # [Bd] int64 context lengths (on the CPU)
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_blocks * block_size] bool
    # Every row of the step as one query over its own first `row_lens[i]` tokens (prefill rows
    # included), when the engine provides it: [T, max_blocks] int64 and [T] int64, CPU.
    row_block_tables: torch.Tensor | None = None
    row_lens: torch.Tensor | None = None
    derived: dict[str, Any] = field(default_factory=dict)  # per-step data other kernels build


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store the new tokens' keys and values. k, v: [T, n_kv_heads, head_dim]."""
    n_kv, dim = k.shape[1], k.shape[2]
    k_cache.view(-1, n_kv, dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, n_kv, dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` cached tokens: [length, n_kv_heads, head_dim]."""
    return cache[block_table].flatten(0, 1)[:length]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (already written to the cache). Returns [T, H, D]."""
    out = torch.empty_like(q)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        # 4-D inputs: on the CPU, 3-D ones take a path several times slower
        qc = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        if chunk.fresh:  # a fresh prompt: attend over its own new keys
            kc, vc = k[rows], v[rows]  # [L, Hkv, D]
            causal, mask = True, None
        else:
            kc = _gather(k_cache, chunk.block_table, chunk.context_len)  # [ctx, Hkv, D]
            vc = _gather(v_cache, chunk.block_table, chunk.context_len)
            causal, mask = False, chunk.mask
        o = F.scaled_dot_product_attention(
            qc,
            kc.transpose(0, 1).unsqueeze(0).to(q.dtype),
            vc.transpose(0, 1).unsqueeze(0).to(q.dtype),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o.squeeze(0).transpose(0, 1)
    if meta.decode_rows is None:
        return out
    assert meta.decode_block_tables is not None and meta.decode_lens is not None
    native = kernels() if q.device.type == "cpu" and q.dtype == torch.float32 else None
    if native is not None:  # straight from the blocks: no padded copy of the keys and values
        out[meta.decode_rows] = native.paged_decode(
            q[meta.decode_rows], k_cache, v_cache, meta.decode_block_tables, meta.decode_lens, scale
        )
    else:
        out[meta.decode_rows] = decode_attention_torch(
            q[meta.decode_rows], k_cache, v_cache, meta, scale
        )
    return out


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The decode rows' attention in plain torch (CUDA, or without the native kernels): each
    sequence's blocks gathered and padded, masked past its length. q: [Bd, H, D]."""
    assert meta.decode_block_tables is not None and meta.decode_lens is not None
    if meta.decode_mask is None:  # built once per step, shared by every layer
        n = meta.decode_block_tables.shape[1] * meta.block_size
        lens = meta.decode_lens.to(q.device)
        mask = torch.arange(n, device=q.device).unsqueeze(0) < lens.unsqueeze(1)
        meta.decode_mask = mask[:, None, None, :]
    kd = k_cache[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)  # [Bd, Hkv, S, D]
    vd = v_cache[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        kd.to(q.dtype),
        vd.to(q.dtype),
        attn_mask=meta.decode_mask,
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(2)


def row_contexts(meta: AttentionMetadata, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of the step as one query over its own context, for kernels that attend row by
    row (a prefill row at position p over the sequence's first p + 1 tokens): block tables
    [rows, max_blocks] and lengths [rows], int64 on the CPU. The engine's `row_block_tables`
    and `row_lens` where it gave them; otherwise built here once per step."""
    if meta.row_lens is not None:
        assert meta.row_block_tables is not None
        return meta.row_block_tables, meta.row_lens
    if "row_contexts" in meta.derived:
        return meta.derived["row_contexts"]
    width = max((len(c.block_table) for c in meta.prefills), default=1)
    if meta.decode_block_tables is not None:
        width = max(width, meta.decode_block_tables.shape[1])
    tables = torch.zeros(rows, width, dtype=torch.int64)
    lens = torch.zeros(rows, dtype=torch.int64)
    for c in meta.prefills:
        r = slice(c.start, c.start + c.length)
        tables[r, : len(c.block_table)] = c.block_table.cpu()
        lens[r] = torch.arange(c.context_len - c.length + 1, c.context_len + 1)
    if meta.decode_rows is not None:
        assert meta.decode_block_tables is not None and meta.decode_lens is not None
        rows_d = meta.decode_rows.cpu()
        tables[rows_d, : meta.decode_block_tables.shape[1]] = meta.decode_block_tables.cpu()
        lens[rows_d] = meta.decode_lens.cpu()
    assert bool((lens > 0).all()), "a row of the step belongs to no sequence"
    meta.derived["row_contexts"] = (tables, lens)
    return tables, lens
