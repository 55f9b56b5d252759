"""The stored forms of a linear weight that the native kernels read (see quant.py for when each
is used): 4-bit and 8-bit groups of 32 (`QuantWeight`, GGUF's Q4_1 and Q8_0 layouts), the same
values in panels of 32 output columns or in VNNI blocks of 16 rows, and fp32 in panels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32
PANEL = 32  # output columns per packed panel (kernels.cpp: PW)
VNNI_ROWS = 16  # output rows per block of the VNNI 4-bit kernel (q4_vnni.h: VR)
# A weight as the native kernels take it: (format, tensors...); see kernels.cpp, weight_linear
Spec = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class QuantWeight:
    fmt: str  # "q4" | "q8"
    packed: torch.Tensor  # q4: [N, K/2] uint8 (two per byte); q8: [N, K] int8
    scales: torch.Tensor  # [N, K/32] fp32
    mins: torch.Tensor | None  # q4 only: [N, K/32] fp32

    def levels(self) -> torch.Tensor:
        """The stored integers, [N, K]: q4 0..15 (uint8), q8 -127..127 (int8)."""
        if self.fmt == "q4":
            n = self.scales.shape[0]
            lo, hi = self.packed & 15, self.packed >> 4
            return torch.cat([lo.view(n, -1, 16), hi.view(n, -1, 16)], dim=-1).view(n, -1)
        return self.packed

    def dequantize(self) -> torch.Tensor:
        n = self.scales.shape[0]
        w = self.levels().view(n, -1, GROUP).float() * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.view(n, -1)

    def in_panels(self) -> Spec | None:
        """The same weight stored as the native panel kernel reads it (formats 5 and 9): levels
        [N/32, K, 32] with K in leaf order (q4: two per byte, rows j and j + 16), scales and
        mins [N/32, K/32, 32]. None when N is not a multiple of 32."""
        if self.scales.shape[0] % PANEL:
            return None
        q, scales = panels_of(leaf_order(self.levels())), panels_of(self.scales)
        if self.fmt == "q4":
            assert self.mins is not None
            return (
                5,
                (q[..., :16] | (q[..., 16:] << 4)).contiguous(),
                scales,
                panels_of(self.mins),
            )
        return (9, q, scales, scales)

    def in_vnni(self) -> Spec | None:
        """A q4 weight as the VNNI kernel reads it (format 6, kernels' q4_vnni.h): blocks of 16
        rows, packed [N/16, K/32, 256] (byte (g, c, j, t): levels of row j at k = 32 g + 8 c + t
        and, high nibble, k + 4), scales and mins [N/16, K/32, 16]. None: not q4, or N is not a
        multiple of 16."""
        n = self.scales.shape[0]
        if self.fmt != "q4" or n % VNNI_ROWS:
            return None
        g = self.scales.shape[1]
        q = self.levels().view(n // VNNI_ROWS, VNNI_ROWS, g, 4, 2, 4)  # rb, j, g, c, hi, t
        q = q.permute(0, 2, 3, 1, 5, 4)  # rb, g, c, j, t, hi
        packed = (q[..., 0] | (q[..., 1] << 4)).reshape(n // VNNI_ROWS, g, 256).contiguous()

        def blocks(t: torch.Tensor) -> torch.Tensor:
            return t.view(n // VNNI_ROWS, VNNI_ROWS, g).transpose(1, 2).contiguous()

        scales, mins = self.row_scales()
        return (6, packed, blocks(scales), blocks(mins))

    @property
    def spec(self) -> Spec:
        """As the native row kernels take a weight: (format, packed, scales, mins or scales)."""
        scales, mins = self.row_scales()
        return (
            (4, self.packed, scales, mins) if self.fmt == "q4" else (8, self.packed, scales, scales)
        )

    def row_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales and mins (q8: the scales twice) as the row kernels read them: fp16 where
        that holds every one exactly, as it does a GGUF's (which stores them so), else fp32. A
        4-bit group is then 20 bytes, not 24, and decode is bound by those bytes."""
        parts = [self.scales] if self.mins is None else [self.scales, self.mins]
        half = [t.half() for t in parts]
        if all(torch.equal(h.float(), t) for h, t in zip(half, parts, strict=True)):
            parts = half
        return parts[0], parts[-1]

    @property
    def nbytes(self) -> int:
        """Bytes the row kernels read for this weight (a decode step's)."""
        scales, mins = self.row_scales()
        parts = (self.packed, scales) + ((mins,) if self.mins is not None else ())
        return sum(t.numel() * t.element_size() for t in parts)


def _as_fp16(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to fp16 values (kept fp32), as a GGUF stores its scales, where every value
    stays a normal fp16 number (or zero); else `t` as it is."""
    h = t.half().float()
    fits = torch.isfinite(h) & ((t == 0) | (h.abs() >= torch.finfo(torch.float16).tiny))
    return h if bool(fits.all()) else t


def quantize_q4(w: torch.Tensor) -> QuantWeight:
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d = _as_fp16((hi - lo) / 15)
    lo = _as_fp16(lo) if torch.equal(d, d.half().float()) else lo  # (with the scales or not)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = ((g - lo[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2).contiguous()
    return QuantWeight("q4", packed, d.contiguous(), lo.contiguous())


def quantize_q8(w: torch.Tensor) -> QuantWeight:
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    d = g.abs().amax(-1) / 127  # (fp32: at 34 bytes per group fp16 saves little, and costs
    # the q8 mode greedy agreement: 78% against 80%+ over the parity prompts)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = (g / safe[..., None]).round().clamp(-127, 127).to(torch.int8)
    return QuantWeight("q8", q.view(n, k).contiguous(), d.contiguous(), None)


def _exact(w: torch.Tensor, qw: QuantWeight) -> bool:
    """Whether `qw` gives back `w` up to fp32 rounding of the scale arithmetic."""
    err = (qw.dequantize() - w).abs()
    tol = 1e-5 * w.abs().amax().clamp_min(1e-30)
    return bool((err <= tol).all())


def choose(w: torch.Tensor, mode: str) -> QuantWeight | None:
    """The stored form of one weight under `mode` (None: keep fp32)."""
    if w.dim() != 2 or w.shape[1] % GROUP or mode == "fp32":
        return None
    if mode == "q4":
        return quantize_q4(w)
    if mode == "q8":
        return quantize_q8(w)
    for make in (quantize_q4, quantize_q8):
        qw = make(w)
        if _exact(w, qw):
            return qw
    return None


def panels_of(t: torch.Tensor) -> torch.Tensor:
    """A per-row tensor [N, C] (N a multiple of 32) as panels: [N/32, C, 32]."""
    n = t.shape[0]
    return t.view(n // PANEL, PANEL, -1).transpose(1, 2).contiguous()


def leaf_order(t: torch.Tensor) -> torch.Tensor:
    """[N, K] with its columns in the kernels' leaf order: column 32 g + l at l * K/32 + g (the
    order in which kernels.cpp sums a row; see its top note)."""
    n, k = t.shape
    return t.view(n, k // GROUP, GROUP).transpose(1, 2).reshape(n, k)


def pack_dense(w: torch.Tensor) -> torch.Tensor | None:
    """`w` [N, K] as the native dense kernel reads it, [N/32, K, 32] with K in leaf order.
    None: it cannot."""
    n, k = w.shape
    if n % PANEL or k % GROUP or w.dtype != torch.float32:
        return None
    return panels_of(leaf_order(w))
