"""The native CPU kernels against plain torch on the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmos.models.attention import AttentionMetadata, decode_attention_torch, paged_attention
from llmos.models.formats import choose, pack_dense, quantize_q4, quantize_q8
from llmos.models.native import kernels

native = kernels()
pytestmark = pytest.mark.skipif(native is None, reason="no C++ compiler for the native kernels")


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 33])
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_quantized_linear_matches_dequantized_matmul(rows: int, fmt: str) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 160, generator=g)
    x = torch.randn(rows, 160, generator=g)
    qw = quantize_q4(w) if fmt == "q4" else quantize_q8(w)
    ref = x @ qw.dequantize().T
    out = native.linear(qw.spec, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # a row's result does not depend on the rows beside it
    alone = native.linear(qw.spec, x[-1:])
    assert torch.equal(alone[0], out[-1])


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_fp16_scales_give_the_fp32_scales_bits(rows: int, fmt: str) -> None:
    """A GGUF's scales are fp16: the row kernels read them so (fewer bytes per step) and give
    bitwise what the same scales in fp32 give; scales fp16 cannot hold stay fp32."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(100, 224, generator=g)  # 100 rows: blocks of 4, then a tail of single rows
    qw = quantize_q4(w) if fmt == "q4" else quantize_q8(w)
    if fmt == "q4":  # q4 rounds its scales to fp16 values, as a GGUF stores them...
        assert torch.equal(qw.scales, qw.scales.half().float())
        tiny = quantize_q4(w * 1e-9)  # ...unless they fall below fp16's normal range
        assert tiny.row_scales()[0].dtype == torch.float32 and tiny.scales.min() > 0
    else:
        assert qw.row_scales()[0].dtype == torch.float32  # (q8 keeps fp32 scales)
        qw.scales = qw.scales.half().float()
    spec = qw.spec
    assert spec[2].dtype == spec[3].dtype == torch.float16
    assert qw.nbytes == qw.packed.numel() + qw.scales.numel() * (4 if fmt == "q4" else 2)
    x = torch.randn(rows, 224, generator=g)
    wide = (spec[0], spec[1], spec[2].float(), spec[3].float())
    assert torch.equal(native.linear(spec, x), native.linear(wide, x))
    if fmt == "q4":  # (q8 has no mins to mismatch)
        with pytest.raises(RuntimeError, match="typed as the scales"):
            native.linear((4, spec[1], spec[2], spec[3].float()), x)


@pytest.mark.skipif(native is None or not native.has_vnni(), reason="no AVX-512 VNNI here")
@pytest.mark.parametrize("half", [False, True])
def test_vnni_q4_kernel_is_as_exact_as_fp32_and_batch_invariant(half: bool) -> None:
    """Format 6 splits each activation into three int8 digits and sums with VNNI: its error
    against the exact product stays near the fp32 kernel's (not int8 rounding's, ~1e-2), and a
    row's bits do not depend on the rows beside it, at any step size."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(160, 576, generator=g) * 0.05 + 0.01
    qw = quantize_q4(w)  # (its scales and mins are fp16 values)
    if not half:  # scales fp16 cannot hold: read as fp32
        qw.scales, qw.mins = qw.scales * (1 + 2**-20), qw.mins * (1 + 2**-20)
    spec = qw.in_vnni()
    assert spec is not None and spec[0] == 6
    assert spec[2].dtype == (torch.float16 if half else torch.float32)
    x = torch.randn(40, 576, generator=g) * 3
    x[5, 64:96] = 0  # a group of zeros
    x[6, :32] *= 1e4  # one group far larger than the rest of its row
    x[7, 32:64] = 1e-41  # subnormal values: no inf or NaN
    exact = x.double() @ qw.dequantize().double().T
    out = native.linear(spec, x)
    err = ((out.double() - exact).abs() / exact.abs().mean(1, keepdim=True)).max().item()
    fp32_err = (
        ((native.linear(qw.spec, x).double() - exact).abs() / exact.abs().mean(1, keepdim=True))
        .max()
        .item()
    )
    assert err < max(4 * fp32_err, 1e-6), (err, fp32_err)
    for rows in (1, 3, 8, 9, 17):  # tiles of 8 rows, and their tails
        part = native.linear(spec, x[:rows])
        assert torch.equal(part, out[:rows])
        assert torch.equal(native.linear(spec, x[rows - 1 : rows])[0], out[rows - 1])
    assert native.linear(spec, x[:0]).shape == (0, 160)
    assert qw.in_vnni() is not None and quantize_q8(w).in_vnni() is None
    assert quantize_q4(torch.randn(40, 64)).in_vnni() is None  # 40 rows: not blocks of 16
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native.linear(spec, torch.randn(1, 100))
    with pytest.raises(RuntimeError, match=r"\[N/16, K/32, 256\]"):
        native.linear((6, spec[1][:, :-1], spec[2], spec[3]), torch.randn(1, 576))
    with pytest.raises(RuntimeError, match="both be float32 or both float16"):
        native.linear((6, spec[1], spec[2].float(), spec[3].half()), torch.randn(1, 576))


@pytest.mark.skipif(native is None or not native.has_panels(), reason="no panel kernels")
@pytest.mark.parametrize("rows", [1, 5, 12, 13, 64, 200])
@pytest.mark.parametrize("fmt", ["fp32", "q4", "q8"])
def test_panel_linear_matches_matmul(rows: int, fmt: str) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 160, generator=g)
    x = torch.randn(rows, 160, generator=g)
    if fmt == "fp32":
        packed = pack_dense(w)
        assert packed is not None and pack_dense(torch.randn(40, 160)) is None  # N % 32 != 0
        spec = (1, packed, w, w)
    else:
        qw = quantize_q4(w) if fmt == "q4" else quantize_q8(w)
        spec, w = qw.in_panels(), qw.dequantize()
        assert spec is not None
    out = native.linear(spec, x)
    torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4)
    for i in (0, rows - 1):  # a row's result does not depend on the rows beside it
        assert torch.equal(native.linear(spec, x[i : i + 1])[0], out[i])


def test_auto_keeps_exact_formats_and_leaves_others() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    q4 = quantize_q4(w).dequantize()  # a weight that is exactly 4-bit, as a Q4_1 tensor is
    q8 = quantize_q8(w).dequantize()
    assert choose(q4, "auto").fmt == "q4"
    assert choose(q8, "auto").fmt == "q8"
    assert choose(w, "auto") is None  # a full-precision weight stays fp32
    assert choose(w, "q4").fmt == "q4" and choose(w, "fp32") is None
    assert choose(torch.randn(8, 40), "q8") is None  # K not a multiple of 32


@pytest.mark.parametrize("d", [16, 64, 128])  # 64 and 128 take the blocked fast path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_decode_matches_sdpa(dtype: torch.dtype, d: int) -> None:
    g = torch.Generator().manual_seed(1)
    blocks, bs, hkv, heads = 24, 4, 2, 6
    k_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(dtype)
    lens = [1, 7, 13, 16, 37]  # keys are scored 16 at a time: within, at and across groups
    tables = torch.tensor(
        [
            [5] + [0] * 9,
            [3, 9] + [0] * 8,
            [11, 2, 8, 1] + [0] * 6,
            [0, 4, 6, 7] + [0] * 6,
            [23, 10, 12, 13, 14, 15, 16, 17, 18, 19],
        ]
    )
    q = torch.randn(5, heads, d, generator=g)
    out = native.paged_decode(q, k_cache, v_cache, tables, torch.tensor(lens), 0.25)
    for b, n in enumerate(lens):
        k = k_cache[tables[b]].flatten(0, 1)[:n].float().transpose(0, 1)  # [Hkv, n, D]
        v = v_cache[tables[b]].flatten(0, 1)[:n].float().transpose(0, 1)
        ref = F.scaled_dot_product_attention(
            q[b].unsqueeze(1), k, v, scale=0.25, enable_gqa=True
        ).squeeze(1)
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_native_and_torch_paths_agree() -> None:
    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = torch.randn(2, 10, 4, 3, 8, generator=g)
    q = torch.randn(2, 6, 8, generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([0, 1]),
        prefills=[],
        block_size=4,
        decode_rows=torch.tensor([0, 1]),
        decode_block_tables=torch.tensor([[7, 2, 0], [4, 0, 0]]),
        decode_lens=torch.tensor([10, 3]),
    )
    fast = paged_attention(q, q[:, :3], q[:, :3], k_cache, v_cache, meta, 0.3)
    slow = decode_attention_torch(q, k_cache, v_cache, meta, 0.3)  # the path CUDA takes
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_an_empty_cache_dir_turns_off_the_kernel_cache_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """`LLMOS_CACHE_DIR=""` turned off the model cache but still built kernels into ~/.cache."""
    from llmos.models import native
    from llmos.models.cache import cache_dir, scratch_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LLMOS_CACHE_DIR", "")
    assert cache_dir() is None
    build = native._build_dir("k")
    assert build.is_relative_to(scratch_dir()) and not build.is_relative_to(tmp_path)
    monkeypatch.setenv("LLMOS_CACHE_DIR", str(tmp_path / "c"))
    assert native._build_dir("k") == tmp_path / "c" / "kernels" / "k"


@pytest.mark.skipif(native is None or not native.has_panels(), reason="no panel kernels")
@pytest.mark.parametrize("fmt", ["fp32", "q4", "q8"])
@pytest.mark.parametrize("k", [160, 576])
def test_rows_and_panels_give_the_same_bits(fmt: str, k: int) -> None:
    """Batch invariance by construction: whichever kernel serves a step, and whatever its row
    count, a row's outputs are the same sum in the same order (kernels.cpp, the fixed order)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(64, k, generator=g)
    x = torch.randn(300, k, generator=g)
    if fmt == "fp32":
        rows_spec = panels_spec = (1, pack_dense(w), w, w)
    else:
        qw = quantize_q4(w) if fmt == "q4" else quantize_q8(w)
        rows_spec, panels_spec = qw.spec, qw.in_panels()
    full = native.linear(panels_spec, x)
    for m in (1, 2, 7, 8, 9, 12, 13, 64, 299):
        assert torch.equal(native.linear(panels_spec, x[:m]), full[:m]), m
        assert torch.equal(native.linear(rows_spec, x[:m]), full[:m]), m
        assert torch.equal(native.linear(rows_spec, x[300 - m :]), full[300 - m :]), m


def test_row_contexts_cover_every_row_of_a_mixed_step() -> None:
    """A step with two prefill chunks (one after cached tokens) and two decode rows: each row
    attends over its own first position + 1 tokens, in its own block table."""
    from llmos.models.attention import PrefillChunk, row_contexts

    meta = AttentionMetadata(
        slot_mapping=torch.arange(7),
        prefills=[
            PrefillChunk(0, 3, 3, torch.tensor([4]), None),
            PrefillChunk(3, 2, 6, torch.tensor([1, 2]), None),
        ],
        block_size=4,
        decode_rows=torch.tensor([5, 6]),
        decode_block_tables=torch.tensor([[7, 8, 9], [3, 0, 0]]),
        decode_lens=torch.tensor([11, 2]),
    )
    tables, lens = row_contexts(meta, 7)
    assert lens.tolist() == [1, 2, 3, 5, 6, 11, 2]
    assert tables.tolist() == [[4, 0, 0]] * 3 + [[1, 2, 0]] * 2 + [[7, 8, 9], [3, 0, 0]]
    assert row_contexts(meta, 7)[0] is tables  # built once per step
