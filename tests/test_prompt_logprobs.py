"""`SamplingParams(prompt_logprobs=k)`: the prompt's log-probabilities, vLLM's shape, checked
against HF transformers' log-softmax on the same GGUF, and the same under chunked prefill, a
warm prefix cache, batching, `n` and preemption."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_oracle import hf_logits, hf_model

from llmos import LLM, SamplingParams
from llmos.errors import RequestError

ATOL = 1e-4  # against HF's fp32 log-softmax (measured worst: 5.6e-5 over 729 tokens, top 5)
LONG = 300  # tokens at least in the last prompt
SAME = 1e-4  # between llmos runs that batch or chunk differently (measured worst: 3e-5)
K = 5
PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "Grüße aus Köln! 日本語のテキスト 🤖 — «quotes» and\ttabs",
    Path(textwrap.__file__).read_text()[:1500],  # real code, ~370 tokens
]
PARAMS = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=K)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[Any]:
    """Each prompt alone on a cold cache."""
    return [llm.generate(p, PARAMS)[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_logprobs(reference: list[Any]) -> list[torch.Tensor]:
    hf = hf_model()
    out = [hf_logits(hf, r.prompt_token_ids).log_softmax(-1) for r in reference]
    del hf
    return out


@pytest.fixture(scope="module")
def chunky() -> LLM:
    """A token budget of 16 per step (so every prompt is prefilled in many chunks) and a KV
    cache of 32 blocks x 16 tokens (so three long requests must preempt one another)."""
    return LLM(max_num_batched_tokens=16, num_kv_blocks=32)


def assert_same(a: list[dict[int, float] | None], b: list[dict[int, float] | None], tol: float):
    assert len(a) == len(b)
    assert a[0] is None and b[0] is None
    for pos, (x, y) in enumerate(zip(a[1:], b[1:], strict=True), 1):
        assert x is not None and y is not None
        assert next(iter(x)) == next(iter(y)), f"position {pos}: a different prompt token"
        for tid in x.keys() & y.keys():
            assert abs(x[tid] - y[tid]) < tol, (pos, tid, x[tid], y[tid])
        # the top k may differ only on a near tie at its edge
        assert len(x.keys() ^ y.keys()) <= 2, (pos, x, y)


def test_shape_is_vllms(reference: list[Any]) -> None:
    assert len(reference[-1].prompt_token_ids) > LONG
    for out in reference:
        ids = out.prompt_token_ids
        lps = out.prompt_logprobs
        assert len(lps) == len(ids) and lps[0] is None
        for pos, entry in enumerate(lps[1:], 1):
            assert next(iter(entry)) == ids[pos], "the prompt token comes first"
            assert len(entry) in (K, K + 1)
            assert all(v <= 0.0 for v in entry.values())
        assert out.outputs[0].logprobs is None  # generated-token logprobs were not asked


def test_match_hf_log_softmax(reference: list[Any], hf_logprobs: list[torch.Tensor]) -> None:
    worst = 0.0
    for out, ref in zip(reference, hf_logprobs, strict=True):
        ids = out.prompt_token_ids
        for pos in range(1, len(ids)):
            row = ref[pos - 1]  # the logits at pos - 1 score token pos
            entry = out.prompt_logprobs[pos]
            for tid, lp in entry.items():
                worst = max(worst, abs(lp - row[tid].item()))
            top = sorted(entry.values(), reverse=True)[:K]
            hf_top = row.topk(K).values
            assert torch.allclose(torch.tensor(top), hf_top, atol=ATOL), pos
    assert worst < ATOL, worst


def test_warm_prefix_cache_is_recomputed(llm: LLM, reference: list[Any]) -> None:
    long_prompt = PROMPTS[-1]
    warm = llm.generate(long_prompt, SamplingParams(temperature=0, max_tokens=1))[0]
    assert warm.num_cached_tokens >= LONG  # the reference left the prompt in the cache
    again = llm.generate(long_prompt, PARAMS)[0]
    assert again.num_cached_tokens == 0  # a cached block's logits were never kept
    assert_same(again.prompt_logprobs, reference[-1].prompt_logprobs, SAME)
    # and the cache still serves requests that do not ask
    after = llm.generate(long_prompt, SamplingParams(temperature=0, max_tokens=1))[0]
    assert after.num_cached_tokens >= LONG


def test_batched_with_n_and_other_requests(llm: LLM, reference: list[Any]) -> None:
    params = [
        SamplingParams(temperature=0.8, seed=3, max_tokens=4, prompt_logprobs=K, n=3),
        SamplingParams(temperature=0, max_tokens=8),
        SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K, logprobs=2),
    ]
    outs = llm.generate(PROMPTS, params)
    assert_same(outs[0].prompt_logprobs, reference[0].prompt_logprobs, SAME)
    assert len(outs[0].outputs) == 3
    assert outs[1].prompt_logprobs is None
    assert_same(outs[2].prompt_logprobs, reference[2].prompt_logprobs, SAME)
    assert len(outs[2].logprobs) == 2


def test_chunked_prefill_and_preemption(chunky: LLM, reference: list[Any]) -> None:
    lone = chunky.generate(PROMPTS[-1], PARAMS)[0]
    assert_same(lone.prompt_logprobs, reference[-1].prompt_logprobs, SAME)
    # three 100-token prompts growing by 100 tokens each need more than the 512 cached tokens
    ids = reference[-1].prompt_token_ids
    prompts = [ids[i * 100 : i * 100 + 100] for i in range(3)]
    before = chunky.engine.scheduler.num_preemptions
    many = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, prompt_logprobs=2)
    outs = chunky.generate(prompts, many)
    assert chunky.engine.scheduler.num_preemptions > before
    for p, out in zip(prompts, outs, strict=True):
        alone = chunky.generate(p, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))
        assert_same(out.prompt_logprobs, alone[0].prompt_logprobs, SAME)
    assert chunky.engine.blocks.num_used == 0


def test_edges_and_bad_values(llm: LLM) -> None:
    one = llm.generate([1], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert one.prompt_logprobs == [None]
    zero = llm.generate("Hello there", SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert all(len(e) == 1 for e in zero.prompt_logprobs[1:])  # the prompt token alone
    for bad in (-1, 21, 1.5):
        with pytest.raises(RequestError) as err:
            SamplingParams(prompt_logprobs=bad)
        assert err.value.param == "prompt_logprobs"
