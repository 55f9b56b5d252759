"""Weight-only quantization, applied after loading: `quantize(model, mode)` swaps the model's
`linear` hooks for kernels that read 4- or 8-bit weights, as `batch_invariant.py` swaps them for
tiled ones. The model file has no flags.

Formats (groups of 32 along the input dimension, as GGUF's; stored as `formats.py` says):
- q4: `w = d * q + m`, q in [0, 15], one scale d and min m per group (Q4_1's layout).
- q8: `w = d * q`, q in [-127, 127], one scale per group (Q8_0's layout).
The row kernels read the scales as fp16 where that holds them exactly (a GGUF's are fp16), so a
decode step reads the file's bytes and no more. Quantizing to q4 rounds the scales and mins to
fp16 values, as GGUF's Q4_1 does (the "q4" mode here: 80 MiB per token, not 96, perplexity
26.60 against 26.43); q8 keeps fp32 scales (fp16 saved a nineteenth and cost greedy agreement).

Modes:
- "auto" (the default): each weight is stored in the smallest of these formats that holds it
  exactly (to fp32 rounding), else kept in fp32. A GGUF's Q4_1 and Q8_0 tensors come back to
  their own formats, so the model computes what the file says, only faster; an fp32 or fp16
  checkpoint is left as it is.
- "q8", "q4": every linear weight in that format (lossy for weights that were not already).
- "fp32": every weight stays fp32 (decode steps still take the fused native layer).

The native kernels (models/native) read each weight one of two ways, by the size of the step
(`Kernels`):
- up to `max_rows` tokens, row by row in the formats above: the weight bytes are the cost, and
  each is read once per step;
- beyond, in panels of 32 output columns (`QuantWeight.in_panels`, or `pack_dense` for fp32
  weights), unpacked to fp32 one panel at a time and run through register tiles: the math is
  the cost. A library GEMM re-packs its weight on every call (a fifth of its time at 64 rows);
  panels are packed once, here. Past PACKED_MAX_ROWS (long prefills) torch's matmul is
  faster, and takes every weight whose fp32 form is the same model; a lossy mode's weights
  stay in their format at every size, so it is the same model in prefill and decode.
- On a CPU with AVX-512 VNNI, a q4 weight is read one way at every size up to that
  (`QuantWeight.in_vnni`): integer dot products against activations split into three int8
  digits (kernels' q4_vnni.h), within a few fp32 roundings of the exact product, and 1.8x the
  fp32 row kernel's rate at batch 1.
Steps whose rows each attend over their own paged context (decode, and short prompts beside
it) run each layer as one native call (`FusedDecodeLayer`): at batch 1 the per-op dispatch of
an eager layer costs as much as its math, and at batch 64 it is still a tenth. The whole stack
of such a step is one call (`FusedDecodeStack`, the model's `run_layers` hook).
Without the native kernels, or off the CPU, the transform does nothing.

`invariant=True` (deterministic mode, through `make_batch_invariant`): the row and panel
kernels give the same bits for a row (kernels.cpp sums every output in one fixed order), so
every step, of any size, runs every layer as the one native call, every row attending over its
own context, and never falls to torch's matmul: a row's logits do not depend on the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmos.models.attention import AttentionMetadata, row_contexts
from llmos.models.formats import QuantWeight, Spec, choose, pack_dense
from llmos.models.llama import Layer, LinearFn, LlamaModel
from llmos.models.native import kernels

log = logging.getLogger(__name__)
MODES = ("auto", "fp32", "q8", "q4")
DEFAULT_MAX_ROWS = 10  # measured: row kernels win at 8 rows, panels from 12
ROWS_ONLY_MAX_ROWS = 48  # a CPU without the panel kernels: rows, then torch's fp32 matmul
# Beyond this many rows, torch's fp32 matmul is as fast as panels (500-row prefill: 7% faster);
# weights whose fp32 form is the same model (fp32, or quantized exactly) go to it there
PACKED_MAX_ROWS = 256


@dataclass(slots=True)
class Kernels:
    """Which native form of each weight (by data_ptr) serves a step: `small` up to `max_rows`
    rows (the quantized rows, read once per step), `big` beyond (panels), up to PACKED_MAX_ROWS
    where the fp32 weights are the same model. A lossy mode's weights stay in their format at
    every step size where the CPU has the panel kernels, so it is the same model in prefill and
    decode; elsewhere `big` is empty and bigger steps use torch's matmul on the fp32 weights."""

    small: dict[int, Spec]
    big: dict[int, Spec]
    max_rows: int
    exact: bool = True  # the quantized weights hold the fp32 values exactly ("auto")
    invariant: bool = False  # never torch's matmul (its sums depend on the row count)

    def spec(self, w: torch.Tensor, rows: int) -> Spec | None:
        key = w.data_ptr()
        if rows <= self.max_rows:
            return self.small.get(key)
        spec = self.big.get(key)
        if self.invariant:
            return spec or self.small.get(key)
        if spec is not None and rows > PACKED_MAX_ROWS and (spec[0] == 1 or self.exact):
            return None  # the same values, and torch's matmul is faster here
        return spec


def quant_linear(chosen: Kernels, native) -> LinearFn:  # noqa: ANN001
    def linear(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        spec = chosen.spec(weight, x.shape[0]) if x.dtype == torch.float32 else None
        if spec is None:
            return F.linear(x, weight, bias)
        out = native.linear(spec, x)
        return out + bias if bias is not None else out

    return linear


def layer_weights(layer: Layer) -> tuple[torch.Tensor, ...]:
    """A layer's linear weights, in the order the native decode layer takes them."""
    return (layer.qkv, layer.o, layer.gate_up, layer.down)


def linear_weights(model: LlamaModel) -> list[torch.Tensor]:
    """Every linear weight a decode step reads: each layer's, then the LM head."""
    layers = [getattr(m, "inner", m) for m in model.layers]  # (under a FusedDecodeLayer)
    head = model.embed if model.lm_head is None else model.lm_head
    return [w for layer in layers for w in layer_weights(layer)] + [head]


class FusedDecodeLayer(nn.Module):
    """A layer whose steps run as one native call (norms, RoPE, the KV write, attention and the
    MLP without a Python op between them) when the engine gives every row its own attention
    context (decode steps, and steps with a few short prefill rows beside them); the weights
    are read in the form `Kernels` picks for the step's size (fp32 matmul where there is none).
    Other steps (long prefills) go to the wrapped layer unchanged."""

    def __init__(self, layer: Layer, chosen: Kernels, native: Any) -> None:  # noqa: ANN401 - the compiled module
        super().__init__()
        self.inner = layer
        self.max_rows = chosen.max_rows
        self.invariant = chosen.invariant
        self.native = native
        mats = layer_weights(layer)
        self.weights = [chosen.small.get(w.data_ptr(), (0, w, w, w)) for w in mats]
        self.dense = [
            chosen.spec(w, self.max_rows + 1) or (0, w, w, w)
            if chosen.invariant
            else chosen.big.get(w.data_ptr(), (0, w, w, w))
            for w in mats
        ]

    def contexts(
        self, x: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's block table and context length, where the native layer serves this step;
        None where the wrapped layer does."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        if meta.row_lens is not None:
            return meta.row_block_tables, meta.row_lens
        return row_contexts(meta, x.shape[0]) if self.invariant else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if (rows := self.contexts(x, meta)) is None:
            return self.inner(x, cos, sin, k_cache, v_cache, meta)
        tables, lens = rows
        layer, cfg = self.inner, self.inner.cfg
        qkv, o, gate_up, down = self.weights if x.shape[0] <= self.max_rows else self.dense
        return self.native.decode_layer(
            x.contiguous(),
            layer.input_norm,
            layer.post_norm,
            cfg.rms_norm_eps,
            qkv,
            layer.qkv_bias,
            o,
            gate_up,
            down,
            cos.contiguous(),
            sin.contiguous(),
            k_cache,
            v_cache,
            meta.slot_mapping,
            tables,
            lens,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim**-0.5,
        )


class FusedDecodeStack:
    """Every layer of a step the fused layers serve, in one native call (kernels.cpp,
    DecodeStack): a Python loop between layers ran the interpreter with caches each layer's
    weights had just evicted, tens of µs per layer at batch 1. Steps the fused layers do not
    serve (long prefills) are left to the model's own loop."""

    def __init__(self, layers: list[FusedDecodeLayer], native: Any) -> None:  # noqa: ANN401 - the compiled module
        self.first = layers[0]
        inner = [f.inner for f in layers]
        cfg = inner[0].cfg
        self.stack = native.DecodeStack(
            [layer.input_norm for layer in inner],
            [layer.post_norm for layer in inner],
            [layer.qkv_bias for layer in inner],
            [f.weights for f in layers],
            [f.dense for f in layers],
            cfg.rms_norm_eps,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim**-0.5,
        )

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        if (rows := self.first.contexts(x, meta)) is None:
            return None
        big = x.shape[0] > self.first.max_rows
        return self.stack.forward(x, cos, sin, kv_caches, meta.slot_mapping, *rows, big)


def quantize(
    model: LlamaModel, mode: str = "auto", max_rows: int | None = None, invariant: bool = False
) -> dict[str, int]:
    """Swap `model`'s linear hooks for quantized kernels. Returns {format: weights} counts.
    `invariant`: batch-invariant steps (needs the panel kernels; see the module's note)."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, got {mode!r}")
    native = kernels()
    if native is None or model.embed.device.type != "cpu":
        return {}
    if max_rows is None:
        max_rows = DEFAULT_MAX_ROWS if native.has_panels() else ROWS_ONLY_MAX_ROWS
    if invariant and not native.has_panels():
        raise ValueError("batch-invariant native kernels need the panel kernels (AVX-512)")
    table: dict[int, QuantWeight] = {}
    chosen = Kernels({}, {}, max_rows, exact=mode in ("auto", "fp32"), invariant=invariant)
    counts: dict[str, int] = {}

    def add(w: torch.Tensor) -> None:
        key, qw = w.data_ptr(), choose(w, mode)
        fmt = qw.fmt if qw is not None else "fp32"
        counts[fmt] = counts.get(fmt, 0) + 1
        if qw is not None:
            table[key], chosen.small[key] = qw, qw.spec
            if native.has_vnni() and (vnni := qw.in_vnni()) is not None:
                # steps of every size read it through the one kernel (q4_vnni.h)
                chosen.small[key] = chosen.big[key] = vnni
                return
        if native.has_panels():
            big = qw.in_panels() if qw is not None else None
            if big is None and (dense := pack_dense(w)) is not None:
                big = (1, dense, w, w)
            if big is not None:
                chosen.big[key] = big
                chosen.small.setdefault(key, big)

    for w in linear_weights(model):
        add(w)
    hook: Callable[..., torch.Tensor] = quant_linear(chosen, native)
    for i, layer in enumerate(model.layers):
        layer.linear = hook
        model.layers[i] = FusedDecodeLayer(layer, chosen, native)
    model.run_layers = FusedDecodeStack(list(model.layers), native)  # type: ignore[arg-type]
    model.linear = hook
    model.quantized = table  # (read by weight_bytes)
    model.kernels = chosen
    log.info("weights: %s", counts)
    return counts


def weight_bytes(model: LlamaModel) -> int:
    """Bytes of linear weights one decode step reads (its quantized copies where it has them)."""
    table: dict[int, QuantWeight] = getattr(model, "quantized", {})
    total = 0
    for w in linear_weights(model):
        qw = table.get(w.data_ptr())
        total += qw.nbytes if qw is not None else w.numel() * w.element_size()
    return total
