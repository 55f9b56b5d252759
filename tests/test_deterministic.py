"""Deterministic mode: a request's tokens and logprobs are bitwise the same whatever the load."""

from __future__ import annotations

import random

import pytest

from llmos import LLM, SamplingParams
from llmos.engine.config import EngineConfig
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sequence import RequestOutput

WORDS = ["river", "kernel", "page", "cache", "token", "moon", "quietly", "because", "seven"]


@pytest.fixture(scope="module")
def det_llm() -> LLM:
    return LLM(deterministic=True, kv_cache_memory="64MiB")


def run_mixed(engine: LLMEngine, target: str, params: SamplingParams, seed: int) -> RequestOutput:
    """The target among 15 random others, arriving at random steps."""
    rng = random.Random(seed)
    arrivals: dict[int, list[tuple[str, str, SamplingParams]]] = {}
    for i in range(15):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 120)))
        p = SamplingParams(
            temperature=rng.choice([0.0, 0.8]),
            seed=rng.randint(0, 99),
            max_tokens=rng.randint(1, 24),
            ignore_eos=True,
        )
        arrivals.setdefault(rng.randint(0, 6), []).append((f"o{seed}-{i}", text, p))
    arrivals.setdefault(rng.randint(0, 6), []).append((f"t{seed}", target, params))
    result = None
    step = 0
    while step <= 6 or engine.has_unfinished_requests():
        for rid, text, p in arrivals.get(step, []):
            engine.add_request(rid, text, p)
        for out in engine.step():
            if out.request_id == f"t{seed}" and out.finished:
                result = out
        step += 1
    assert result is not None
    return result


def test_bitwise_equal_alone_and_under_load(det_llm: LLM) -> None:
    preemptions = 0
    for seed in range(20):
        rng = random.Random(1000 + seed)
        target = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        params = SamplingParams(
            temperature=rng.choice([0.0, 1.0]), seed=seed, max_tokens=8, ignore_eos=True, logprobs=2
        )
        alone = det_llm.generate(target, params)[0]
        # a fresh engine per seed: random chunk size, a cache small enough to preempt
        engine = LLMEngine(
            EngineConfig(
                deterministic=True,
                num_kv_blocks=rng.randint(14, 24),
                max_num_batched_tokens=rng.choice([16, 40, 97, 256]),
            )
        )
        mixed = run_mixed(engine, target, params, seed)
        preemptions += engine.stats().num_preemptions
        assert mixed.token_ids == alone.token_ids, seed
        assert [(lp.logprob, lp.top) for lp in mixed.logprobs] == [
            (lp.logprob, lp.top) for lp in alone.logprobs
        ], seed
        again = det_llm.generate(target, params)[0]  # now with prefix-cache hits
        assert [lp.logprob for lp in again.logprobs] == [lp.logprob for lp in alone.logprobs]
        assert engine.blocks.num_used == 0
    assert preemptions > 0, "the small caches were meant to force preemption"


def test_deterministic_agrees_with_default_mode(det_llm: LLM, llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    a = det_llm.generate("The capital of France is", params)[0]
    b = llm.generate("The capital of France is", params)[0]
    assert a.token_ids == b.token_ids
    assert (
        max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3
    )


def test_deterministic_mode_runs_the_native_kernels(det_llm: LLM) -> None:
    """Where the native kernels serve (CPU, AVX-512), deterministic mode is their invariant
    path, not the slow torch tiles: every layer one fused native call, no torch matmul."""
    from llmos.models.batch_invariant import native_invariant_available
    from llmos.models.quant import FusedDecodeLayer

    model = det_llm.engine.model
    if not native_invariant_available(model):
        pytest.skip("no native panel kernels here: deterministic mode uses the torch tiles")
    assert model.kernels.invariant
    assert all(isinstance(layer, FusedDecodeLayer) for layer in model.layers)
    head = model.embed if model.lm_head is None else model.lm_head
    assert model.kernels.spec(head, 4096) is not None  # a long prefill's rows stay native
