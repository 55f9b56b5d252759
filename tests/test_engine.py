"""The engine on the real embedded model: batching, chunking, preemption, sampling, stopping."""

from __future__ import annotations

import random

import pytest

from llmos import LLM, SamplingParams
from llmos.errors import ContextLengthExceeded, RequestError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

# Prompts whose greedy paths have no near-ties (checked by test_reference_has_clear_margins):
# a batch changes float summation order, which may flip a token only where two are almost tied.
PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import numpy as np\n",
    "1, 2, 3, 4, 5,",
]


def chat_ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_reference_has_clear_margins(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    for out in llm.generate(PROMPTS, params):
        for lp in out.logprobs:
            (_, best), (_, second) = lp.top
            assert best - second > 0.02, f"near-tie in {out.text!r}"


def test_same_greedy_tokens_alone_and_in_a_batch_of_32(llm: LLM) -> None:
    alone = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    rng = random.Random(0)
    others: list[str | list[int]] = []
    params: list[SamplingParams] = []
    for i in range(32 - len(PROMPTS)):
        words = " ".join(
            rng.choice(["cat", "river", "code", "tree", "moon", "x"])
            for _ in range(rng.randint(3, 200))
        )
        others.append(chat_ids(llm, words) if i % 2 else words)
        params.append(
            SamplingParams(
                temperature=rng.choice([0.0, 0.7, 1.0]),
                seed=i,
                top_p=rng.choice([1.0, 0.9]),
                max_tokens=rng.randint(1, 40),
            )
        )
    mixed_prompts = others[:10] + PROMPTS[:1] + others[10:20] + PROMPTS[1:] + others[20:]
    mixed_params = (
        params[:10] + [GREEDY] + params[10:20] + [GREEDY] * (len(PROMPTS) - 1) + params[20:]
    )
    outs = llm.generate(mixed_prompts, mixed_params)
    assert len(outs) == 32
    got = [outs[10].token_ids] + [o.token_ids for o in outs[21 : 21 + len(PROMPTS) - 1]]
    assert got == alone


def test_chunked_prefill_and_preemption_do_not_change_output(llm: LLM) -> None:
    prompts = [p * 3 for p in PROMPTS] + ["Once upon a time, " * 20]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = [o.token_ids for o in llm.generate(prompts, params)]
    # 12 blocks of 16 tokens: not enough for all four at once, and 32-token prefill chunks
    small = LLM(num_kv_blocks=12, max_num_batched_tokens=32)
    outs = small.generate(prompts, params)
    stats = small.engine.stats()
    assert stats.num_preemptions > 0, "the cache was meant to force preemption"
    assert [o.token_ids for o in outs] == reference
    assert stats.kv_blocks_used == 0


def test_outputs_come_back_in_prompt_order(llm: LLM) -> None:
    lens = [30, 1, 12, 5]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
    outs = llm.generate(["a", "b", "c", "d"], params)
    assert [len(o.token_ids) for o in outs] == lens
    assert all(o.finish_reason == "length" for o in outs)
    assert outs[1].prompt_token_ids == llm.tokenizer.encode("b")


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm: LLM) -> None:
    def run(seed: int, batch_with_others: bool = False) -> list[int]:
        params = SamplingParams(
            temperature=1.0, top_p=0.95, max_tokens=32, seed=seed, ignore_eos=True
        )
        prompts: list[str] = ["Tell me about the sea."]
        plist = [params]
        if batch_with_others:
            prompts += ["Other request", "Yet another"]
            plist += [SamplingParams(temperature=1.0, max_tokens=8)] * 2
        return llm.generate(prompts, plist)[0].token_ids

    first = run(123)
    assert run(123) == first
    assert run(123, batch_with_others=True) == first
    assert run(124) != first


def test_n_greater_than_one(llm: LLM) -> None:
    out = llm.generate(
        "Name a color:",
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True),
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate(
        "Name a color:",
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True),
    )[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_logprobs(llm: LLM) -> None:
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.logprob <= 0 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    plain = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5))[0]
    assert plain.logprobs is None and plain.token_ids == out.token_ids


def test_stop_string_split_across_tokens_is_cut(llm: LLM) -> None:
    full = llm.generate(PROMPTS[1], GREEDY)[0]
    tok = llm.tokenizer
    # find a boundary between two multi-character tokens and stop on a string spanning it
    pieces = [tok.decode([t]) for t in full.token_ids]
    for i in range(2, len(pieces) - 1):
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2 and pieces[i].strip():
            break
    else:
        pytest.fail("no suitable token boundary")
    stop = pieces[i][-1] + pieces[i + 1][:1]
    cut = full.text.find(stop)
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert stop not in out.text
    kept = llm.generate(
        PROMPTS[1],
        SamplingParams(temperature=0, max_tokens=24, stop=stop, include_stop_str_in_output=True),
    )[0]
    assert kept.text == full.text[: cut + len(stop)]


def test_eos_and_stop_token_ids(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200)
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in out.text
    first = llm.generate(PROMPTS[0], GREEDY)[0].token_ids
    j = next(i for i in range(2, len(first)) if first[i] not in first[:i])
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[first[j]])
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == first[: j + 1]


def test_min_tokens_holds_off_eos(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(temperature=0, max_tokens=60, min_tokens=40),
    )[0]
    assert len(out.token_ids) >= 40


@pytest.mark.parametrize("no_eos", [False, True], ids=["ignore_eos", "tokenizer-without-eos"])
def test_min_tokens_holds_off_stop_token_ids_too(
    llm: LLM, monkeypatch: pytest.MonkeyPatch, no_eos: bool
) -> None:
    """With EOS out of play (ignored, or a tokenizer with none), stop_token_ids must still wait
    for min_tokens: the sampler's ban and the stop check decide from one list."""
    first = llm.generate(PROMPTS[0], GREEDY)[0].token_ids
    stop = first[0]  # what greedy decoding picks first: without the ban it would end at once
    if no_eos:
        monkeypatch.setattr(llm.engine.tokenizer, "eos_token_ids", ())
    params = SamplingParams(
        temperature=0, max_tokens=12, min_tokens=4, stop_token_ids=[stop], ignore_eos=not no_eos
    )
    out = llm.generate(PROMPTS[0], params)[0]
    assert len(out.token_ids) >= 4, out.token_ids
    assert stop not in out.token_ids[:4]
    assert out.finish_reason == "length" or out.token_ids[-1] == stop


def test_penalties_reduce_repetition(llm: LLM) -> None:
    prompt = "one one one one one one one one"
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    penalized = llm.generate(
        prompt,
        SamplingParams(
            temperature=0,
            max_tokens=30,
            ignore_eos=True,
            frequency_penalty=1.5,
            presence_penalty=1.0,
            repetition_penalty=1.3,
        ),
    )

    def distinct(ids: list[int]) -> int:
        return len(set(ids))

    assert distinct(penalized[0].token_ids) > distinct(plain[0].token_ids)


def test_bad_inputs_raise_clear_errors(llm: LLM) -> None:
    with pytest.raises(RequestError, match="prompt must not be empty"):
        llm.generate("", GREEDY)
    with pytest.raises(RequestError, match="prompt must not be empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**6]], GREEDY)
    with pytest.raises(ContextLengthExceeded, match="8192") as info:
        llm.generate("hello", SamplingParams(max_tokens=9000))
    assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded"
    with pytest.raises(RequestError, match="params"):
        llm.generate(["a", "b"], [GREEDY])
    with pytest.raises(RequestError, match="temperature"):
        llm.generate("a", SamplingParams(temperature=-1))
    with pytest.raises(RequestError, match="role"):
        llm.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(RequestError, match="messages"):
        llm.chat([])
    # a failing request in a batch leaves nothing behind (the autouse fixture checks blocks)
    with pytest.raises(RequestError):
        llm.generate(["fine", ""], GREEDY)


def test_prompt_longer_than_the_context_is_refused() -> None:
    small = LLM(max_model_len=64)
    with pytest.raises(ContextLengthExceeded) as info:
        small.generate("word " * 100, SamplingParams(max_tokens=4))
    assert info.value.prompt_tokens > 64 and info.value.limit == 64
    out = small.generate(
        "word " * 10, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    )[0]
    assert len(out.prompt_token_ids) + len(out.token_ids) == 64
    assert out.finish_reason == "length"


def test_kv_memory_follows_tokens_in_use() -> None:
    small = LLM(kv_cache_memory="64MiB", block_size=16)
    engine = small.engine
    assert engine.blocks.num_blocks == (64 * 2**20) // (
        2 * 30 * 3 * 64 * 4 * 16
    )  # from the model file: 30 layers, 3 KV heads, dim 64
    engine.add_request("a", "hello there", SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    used_after_prefill = engine.blocks.num_used
    assert used_after_prefill == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("field", ["kv_cache_memory", "--max-body-size"])
def test_parse_bytes_names_the_field_it_reads(field: str) -> None:
    from llmos.engine.config import parse_bytes

    assert parse_bytes("2GiB", field) == 2 << 30 and parse_bytes("512kb", field) == 512 << 10
    for bad in ("lots", "1.2.3MB", "-5", "0", True):
        with pytest.raises(RequestError) as err:
            parse_bytes(bad, field)  # type: ignore[arg-type]
        assert err.value.param == field and str(err.value).startswith(f"{field}:")


def test_serve_names_max_body_size_in_its_error() -> None:
    from typer.testing import CliRunner

    from llmos.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--port", "0", "--max-body-size", "huge"])
    assert result.exit_code == 2
    assert "--max-body-size" in result.output and "kv_cache_memory" not in result.output
