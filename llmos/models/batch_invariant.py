"""Batch-invariant kernels: a token's logits do not depend on what else is in the batch.

`make_batch_invariant(model)` is a post-hoc transform that swaps the model's kernels. On a CPU
with the native kernels (AVX-512, fp32 activations) it takes the native path, invariant by
construction (quant.py, `invariant=True`; kernels.cpp): every linear output is one sum in one
fixed order whichever kernel serves the step, and every row, prefill rows included, attends
over its own context in an order set by its length alone, so chunking, prefix-cache hits and
preemption do not change a row's sums. That costs little beside the default mode
(BENCHMARKS.md, Determinism). Elsewhere (CUDA, other CPUs, `LLMOS_NATIVE=0`) it takes the
pure-torch tiled path below.

Floating-point addition is not associative, and torch's CPU matmul picks its reduction order
by the number of rows M, so the same row gives different bits in a batch of 1 or of 32. For a
fixed M, though, a row's result depends neither on its position nor on the other rows. So:

- every linear layer runs as a batched matmul over fixed tiles of `TILE` rows (padded);
- attention runs per tile of `TILE` query rows of one sequence, over the keys in fixed chunks
  of `KV_CHUNK` positions with an online softmax. A chunk that is fully masked for a query is
  an exact no-op for it (its weights are exactly 0 and the rescale factor exactly 1), so a
  query's result does not depend on how far its tile-mates reach, nor on chunking or caching;
- RMSNorm, RoPE and the sampler are row-wise already.

The same code runs on CUDA (where cuBLAS has the same fixed-shape property for a given kernel
choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmos.models.attention import AttentionMetadata
from llmos.models.native import kernels
from llmos.models.quant import quantize

TILE = 16
KV_CHUNK = 64


def tiled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [T, K] @ weight.T [K, N] in fixed [TILE, K] tiles → [T, N]."""
    rows, k = x.shape
    if rows == 0:
        return x.new_empty(0, weight.shape[0])
    tiles = -(-rows // TILE)
    xp = F.pad(x, (0, 0, 0, tiles * TILE - rows)).view(tiles, TILE, k)
    out = torch.bmm(xp, weight.t().unsqueeze(0).expand(tiles, k, weight.shape[0]))
    out = out.view(tiles * TILE, -1)[:rows]
    return out + bias if bias is not None else out


def _query_tiles(meta: AttentionMetadata, device: torch.device) -> dict[str, torch.Tensor]:
    """Split every sequence's new rows into tiles of TILE queries, with their key slots."""
    tiles: list[tuple[list[int], list[int], list[int]]] = []  # rows, positions, block table
    for chunk in meta.prefills:
        table = chunk.block_table.tolist()
        first = chunk.context_len - chunk.length
        for off in range(0, chunk.length, TILE):
            n = min(TILE, chunk.length - off)
            tiles.append(
                (
                    list(range(chunk.start + off, chunk.start + off + n)),
                    list(range(first + off, first + off + n)),
                    table,
                )
            )
    if meta.decode_rows is not None:
        assert meta.decode_block_tables is not None and meta.decode_lens is not None
        for row, table, ctx in zip(
            meta.decode_rows.tolist(),
            meta.decode_block_tables.tolist(),
            meta.decode_lens.tolist(),
            strict=True,
        ):
            tiles.append(([row], [ctx - 1], table))
    bs = meta.block_size
    n_chunks = max(-(-(max(pos) + 1) // KV_CHUNK) for _, pos, _ in tiles)
    span = n_chunks * KV_CHUNK
    rows = torch.zeros(len(tiles), TILE, dtype=torch.int64)
    pos = torch.zeros(len(tiles), TILE, dtype=torch.int64)  # padding rows sit at position 0
    valid = torch.zeros(len(tiles), TILE, dtype=torch.bool)
    slots = torch.zeros(len(tiles), span, dtype=torch.int64)
    key_pos = torch.arange(span)
    for i, (r, p, table) in enumerate(tiles):
        rows[i, : len(r)] = torch.tensor(r)
        pos[i, : len(p)] = torch.tensor(p)
        valid[i, : len(r)] = True
        reach = min(span, len(table) * bs)
        t = torch.tensor(table, dtype=torch.int64)
        slots[i, :reach] = t[key_pos[:reach] // bs] * bs + key_pos[:reach] % bs
    mask = key_pos.view(1, 1, -1) <= pos.unsqueeze(-1)  # [NT, TILE, span]
    return {
        "rows": rows.to(device),
        "valid": valid.to(device),
        "slots": slots.to(device),
        "mask": mask.to(device),
        "n_chunks": torch.tensor(n_chunks),
    }


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; new k, v already in the cache. Returns [T, H, D]."""
    t = meta.derived.get("tiles")
    if t is None:
        t = meta.derived["tiles"] = _query_tiles(meta, q.device)
    n_kv, dim = k_cache.shape[2], k_cache.shape[3]
    heads = q.shape[1]
    group = heads // n_kv
    n_tiles = t["rows"].shape[0]
    # [NT, TILE, H, D] → [NT, Hkv, group * TILE, D]: each KV head's queries in one matmul
    qt = (q[t["rows"]] * scale).view(n_tiles, TILE, n_kv, group, dim)
    qt = qt.permute(0, 2, 3, 1, 4).reshape(n_tiles, n_kv, group * TILE, dim)
    flat_k, flat_v = k_cache.view(-1, n_kv, dim), v_cache.view(-1, n_kv, dim)
    m = torch.full((n_tiles, n_kv, group * TILE, 1), float("-inf"), device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros(n_tiles, n_kv, group * TILE, dim, device=q.device)
    for j in range(int(t["n_chunks"])):
        cols = slice(j * KV_CHUNK, (j + 1) * KV_CHUNK)
        kj = flat_k[t["slots"][:, cols]].permute(0, 2, 3, 1).to(q.dtype)  # [NT, Hkv, D, C]
        vj = flat_v[t["slots"][:, cols]].permute(0, 2, 1, 3).to(q.dtype)  # [NT, Hkv, C, D]
        s = torch.matmul(qt, kj)  # [NT, Hkv, group*TILE, C]
        allowed = t["mask"][:, :, cols].unsqueeze(1).expand(n_tiles, group, TILE, KV_CHUNK)
        s = s.masked_fill(~allowed.reshape(n_tiles, 1, group * TILE, KV_CHUNK), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new)
        denom = denom * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.matmul(p, vj)
        m = m_new
    out_t = (acc / denom).view(n_tiles, n_kv, group, TILE, dim).permute(0, 3, 1, 2, 4)
    out_t = out_t.reshape(n_tiles * TILE, heads, dim)
    out = torch.empty_like(q)
    keep = t["valid"].flatten()
    out[t["rows"].flatten()[keep]] = out_t[keep]
    return out


def native_invariant_available(model: torch.nn.Module) -> bool:
    """Whether the native batch-invariant path serves this model (CPU, fp32, AVX-512)."""
    native = kernels()
    embed = model.embed
    return (
        native is not None
        and native.has_panels()
        and embed.device.type == "cpu"
        and embed.dtype == torch.float32
    )


def make_batch_invariant(model: torch.nn.Module, quantization: str = "auto") -> dict[str, int]:
    """Swap the model's linear and attention kernels for batch-invariant ones: the native
    kernels where they serve (returns their {format: weights} counts, as `quantize` does),
    else the torch tiles (returns {})."""
    if native_invariant_available(model):
        return quantize(model, quantization, invariant=True)  # type: ignore[arg-type]
    model.linear = tiled_linear
    for layer in model.layers:
        layer.linear = tiled_linear
        layer.attention = tiled_attention
    return {}
