"""Automatic prefix caching on the real model: shared prefixes reuse blocks, outputs unchanged."""

from __future__ import annotations

from llmos import LLM, SamplingParams

PREFIX = "You are a meticulous assistant. " + " ".join(
    f"Rule {i}: answer with the number {i * 7 % 13}." for i in range(30)
)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)


def test_second_request_hits_and_output_is_unchanged(llm: LLM) -> None:
    llm.engine.blocks.reset_prefix_cache()
    before = llm.engine.stats()
    cold = llm.generate(PREFIX + " Question: what is rule 3?", GREEDY)[0]
    warm = llm.generate(PREFIX + " Question: what is rule 3?", GREEDY)[0]
    bs = llm.engine.blocks.block_size
    n = len(cold.prompt_token_ids)
    assert cold.num_cached_tokens == 0
    assert warm.num_cached_tokens == (n - 1) // bs * bs
    assert warm.token_ids == cold.token_ids
    for a, b in zip(cold.logprobs, warm.logprobs, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-4
    after = llm.engine.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits == warm.num_cached_tokens
    assert after.prefix_cache_queries - before.prefix_cache_queries == 2 * n


def test_same_output_with_and_without_cache_under_pressure() -> None:
    prompts = [PREFIX + f" Question {i}: what is rule {i}?" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(enable_prefix_caching=False).generate(prompts, params)
    # a small cache and small chunks: chunked prefill, preemption and eviction all happen
    cached = LLM(num_kv_blocks=28, max_num_batched_tokens=48)
    first = cached.generate(prompts, params)
    second = cached.generate(prompts[::-1], params)[::-1]
    stats = cached.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert [o.token_ids for o in first] == [o.token_ids for o in plain]
    assert [o.token_ids for o in second] == [o.token_ids for o in plain]
    assert stats.kv_blocks_used == 0


def test_n_and_abort_with_shared_prefix(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request(
        "keep",
        PREFIX + " Tell me a story.",
        SamplingParams(n=3, temperature=0.9, seed=2, max_tokens=8),
    )
    engine.add_request("drop", PREFIX + " Tell me a joke.", SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.abort_request("drop")
    assert not engine.abort_request("drop")  # already gone
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done = out
    assert done is not None and len(done.outputs) == 3
    assert engine.blocks.num_used == 0
