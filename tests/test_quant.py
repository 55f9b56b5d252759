"""Every precision mode against the fp32 reference: max logit difference and greedy agreement
on the parity prompts. "auto" must be exact (it only re-stores what the GGUF already holds);
the lossy modes must stay within measured bounds, and report their figures."""

from __future__ import annotations

import pytest
import torch
from test_parity import GREEDY_CHAT, GREEDY_TEXT, SHORT_PROMPTS

from llmos import LLM, SamplingParams
from llmos.models.attention import AttentionMetadata, PrefillChunk
from llmos.models.llama import LlamaModel
from llmos.models.loader import load_checkpoint
from llmos.models.native import kernels
from llmos.models.quant import quantize, weight_bytes
from llmos.models.registry import resolve

pytestmark = pytest.mark.skipif(kernels() is None, reason="no native kernels on this machine")
# mode: (max |logit - fp32 logit| allowed, least share of greedy tokens equal to fp32's)
BOUNDS = {"auto": (1e-3, 1.0), "q8": (1.5, 0.8), "q4": (6.0, 0.05)}
TOKENS = 48


@pytest.fixture(scope="module")
def ckpt():  # noqa: ANN201
    return load_checkpoint(resolve("smollm2-135m"))


def logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    n, cfg, bs = len(ids), model.cfg, 16
    blocks = n // bs + 1
    caches = [
        (
            torch.zeros(blocks, bs, cfg.num_kv_heads, cfg.head_dim),
            torch.zeros(blocks, bs, cfg.num_kv_heads, cfg.head_dim),
        )
        for _ in range(cfg.num_layers)
    ]
    meta = AttentionMetadata(
        torch.arange(n), [PrefillChunk(0, n, n, torch.arange(blocks), None)], bs
    )
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.arange(n), caches, meta, torch.arange(n))


@pytest.fixture(scope="module")
def reference(ckpt) -> tuple[list[torch.Tensor], list[list[int]]]:  # noqa: ANN001
    model = LlamaModel.from_weights(ckpt.config, ckpt.weights).eval()
    tok = ckpt.tokenizer
    ref_logits = [logits(model, tok.encode(p)) for p in SHORT_PROMPTS]
    llm = LLM(quantization="fp32", kv_cache_memory="64MiB")
    greedy = [o.token_ids for o in llm.generate(prompts(llm), params())]
    return ref_logits, greedy


def prompts(llm: LLM) -> list[list[int]]:
    return [llm.tokenizer.encode(t) for t in GREEDY_TEXT] + [llm.tokenizer.encode_chat(GREEDY_CHAT)]


def params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_mode_against_fp32(mode: str, ckpt, reference) -> None:  # noqa: ANN001
    ref_logits, ref_greedy = reference
    model = LlamaModel.from_weights(ckpt.config, ckpt.weights).eval()
    counts = quantize(model, mode, max_rows=1 << 30)  # the mode's kernels on every row
    assert "q4" in counts or "q8" in counts
    diff = max(
        (logits(model, ckpt.tokenizer.encode(p)) - ref).abs().max().item()
        for p, ref in zip(SHORT_PROMPTS, ref_logits, strict=True)
    )
    # the engine's own paths: fused decode layers and quantized small steps
    llm = LLM(quantization=mode, kv_cache_memory="64MiB")
    outs = [o.token_ids for o in llm.generate(prompts(llm), params())]
    same = sum(
        a == b for o, r in zip(outs, ref_greedy, strict=True) for a, b in zip(o, r, strict=True)
    )
    agreement = same / (len(ref_greedy) * TOKENS)
    print(
        f"\n{mode}: max logit diff {diff:.2e}, greedy agreement {agreement:.1%}, "
        f"{weight_bytes(llm.engine.model) / 2**20:.0f} MiB of weights per decode step"
    )
    max_diff, min_agreement = BOUNDS[mode]
    assert diff <= max_diff, f"{mode}: logits differ from fp32 by {diff}"
    assert agreement >= min_agreement, f"{mode}: greedy agreement {agreement:.1%}"
    if mode == "auto":  # lossless re-storage of a Q4_1/Q8_0 GGUF: the decode path reads less
        fp32 = LLM(quantization="fp32", kv_cache_memory="64MiB").engine.model
        assert weight_bytes(llm.engine.model) < weight_bytes(fp32) / 4
        # and its scales in the file's own fp16: every decode kernel reads them so
        specs = llm.engine.model.kernels.small.values()
        assert all(s[2].dtype == torch.float16 for s in specs if s[0] in (4, 8))


@pytest.mark.skipif(kernels() is None or not kernels().has_panels(), reason="no panel kernels")
def test_each_step_size_reads_the_modes_own_weights(ckpt) -> None:  # noqa: ANN001
    """Small steps read quantized rows, bigger ones panels of the same values; a lossy mode
    keeps them at any size (one model in decode and in a long prefill), while weights whose
    fp32 form is the same model go to torch's matmul where it is faster."""
    q4 = (6, 6, 6) if kernels().has_vnni() else (4, 5, 5)  # (VNNI: one kernel at every size)
    cases = (("q4", *q4), ("auto", *q4[:2], None), ("fp32", 1, 1, None))
    for mode, small, big, huge in cases:
        model = LlamaModel.from_weights(ckpt.config, ckpt.weights).eval()
        quantize(model, mode)
        w = model.layers[0].inner.gate_up
        formats = [model.kernels.spec(w, rows) for rows in (1, 64, 4096)]
        assert [f[0] if f else None for f in formats] == [small, big, huge], mode


def test_one_native_call_serves_every_layer_of_a_decode_step() -> None:
    """The native stack serves decode steps and short chunks beside them, with exactly the
    tokens and log-probabilities the layer-by-layer loop gives; long prefills are left to the
    model's loop."""
    llm = LLM(kv_cache_memory="64MiB", max_num_batched_tokens=128)
    model = llm.engine.model
    stack = model.run_layers
    assert stack is not None
    served: list[int] = []
    passed: list[int] = []

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor | None:
        out = stack(x, *args)
        (passed if out is None else served).append(x.shape[0])
        return out

    long = " ".join(f"word{i}" for i in range(80))  # prefilled in 128-token chunks
    prompts = ["Once upon a time", "def add(a, b):", long]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    model.run_layers = counted
    with_stack = llm.generate(prompts, params)
    assert served.count(3) >= 20  # the three decode rows, step after step
    assert passed and min(passed) > 64  # the long prompt's chunks went to the model's loop
    model.run_layers = None  # the loop over the fused layers, one native call each
    llm.engine.blocks.reset_prefix_cache()  # (the same steps again, not cache hits)
    per_layer = llm.generate(prompts, params)
    for a, b in zip(with_stack, per_layer, strict=True):
        assert a.token_ids == b.token_ids
        logprobs = [o.outputs[0].logprobs for o in (a, b)]
        assert logprobs[0] and logprobs[0] == logprobs[1]
