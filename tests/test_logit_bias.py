"""`logit_bias`, `bad_words` and `allowed_token_ids`: in `SamplingParams` on the real model, with
grammars, `n` and the deterministic mode, and over HTTP through the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from llmos import LLM, SamplingParams
from llmos.engine.async_engine import AsyncEngine
from llmos.engine.sequence import Sequence
from llmos.errors import RequestError
from llmos.server.app import create_app
from llmos.server.launch import RunningServer, serve_in_thread

PROMPT = "The capital of France is"  # greedy: " Paris."
PARIS, SPACE_PARIS, COMMA = 38634, 7042, 28  # "Paris", " Paris", ","
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def greedy(llm: LLM, **kw: object) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return llm.generate(PROMPT, params)[0].token_ids


def test_ids_are_what_the_tests_assume(llm: LLM) -> None:
    assert llm.tokenizer.encode("Paris", add_special_tokens=False) == [PARIS]
    assert llm.tokenizer.encode(" Paris", add_special_tokens=False) == [SPACE_PARIS]
    assert llm.generate(PROMPT, GREEDY)[0].token_ids[0] == SPACE_PARIS


def test_bias_pushes_down_and_up(llm: LLM) -> None:
    assert greedy(llm, logit_bias={SPACE_PARIS: -100})[0] != SPACE_PARIS
    assert greedy(llm, logit_bias={COMMA: 100}) == [COMMA] * 4
    assert greedy(llm, logit_bias={COMMA: 0.0}) == greedy(llm)  # zero changes nothing
    # string keys (as JSON sends them) are token ids too
    assert greedy(llm, logit_bias={str(COMMA): 100}) == [COMMA] * 4


def test_bias_with_n_and_sampling(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=5, logit_bias={COMMA: 100})
    out = llm.generate(PROMPT, params)[0]
    assert [o.token_ids for o in out.outputs] == [[COMMA] * 5] * 3
    # the reported logprobs stay the model's own (vLLM's raw logprobs), not the biased ones
    lp = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, logprobs=1))[0]
    biased = llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=1, logprobs=1, logit_bias={COMMA: 100})
    )[0]
    assert biased.logprobs[0].token_id == COMMA
    assert biased.logprobs[0].top[0] == pytest.approx(lp.logprobs[0].top[0], abs=1e-4)


def test_grammar_has_the_last_word(llm: LLM) -> None:
    choices = ["yes", "no"]
    no = llm.tokenizer.encode("no", add_special_tokens=False)[0]
    yes = llm.tokenizer.encode("yes", add_special_tokens=False)[0]
    for favoured, want in ((no, "no"), (yes, "yes")):
        out = llm.generate(
            PROMPT,
            SamplingParams(temperature=0, choice=choices, max_tokens=5, logit_bias={favoured: 100}),
        )[0]
        assert out.text == want
    # a token the grammar forbids, however biased, is never sampled
    out = llm.generate(
        PROMPT, SamplingParams(temperature=0, choice=choices, logit_bias={COMMA: 100})
    )[0]
    assert out.text in choices and COMMA not in out.token_ids
    # nor do allowed_token_ids that leave the grammar nothing break it
    out = llm.generate(
        PROMPT, SamplingParams(temperature=0, choice=choices, allowed_token_ids=[COMMA])
    )[0]
    assert out.text in choices


def test_allowed_token_ids(llm: LLM) -> None:
    allowed = [COMMA, SPACE_PARIS, 30]
    params = SamplingParams(temperature=1.5, seed=1, n=2, max_tokens=12, allowed_token_ids=allowed)
    out = llm.generate(PROMPT, params)[0]
    for o in out.outputs:
        assert len(o.token_ids) == 12 and set(o.token_ids) <= set(allowed)
    assert greedy(llm, allowed_token_ids=[COMMA]) == [COMMA] * 4


def test_bad_words_as_vllm_makes_them(llm: LLM) -> None:
    # "Paris" and " Paris" are one token each: both are banned
    assert llm.engine.bad_words_ids(["Paris"]) == [[PARIS], [SPACE_PARIS]]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, bad_words=["Paris"]))
    assert SPACE_PARIS not in out[0].token_ids and PARIS not in out[0].token_ids
    assert "Paris" not in out[0].text
    # "Berlin" is two tokens and " Berlin" one: vLLM keeps only the word as written
    berlin = llm.tokenizer.encode("Berlin", add_special_tokens=False)
    assert len(berlin) == 2 and llm.engine.bad_words_ids(["Berlin"]) == [berlin]
    # a multi-token word: its last token is banned only right after the others
    seq = Sequence("r", [1, 2], SamplingParams(), None, max_tokens=8)  # type: ignore[arg-type]
    seq.bad_words_ids = [berlin]
    assert seq.banned_bad_words() == []
    seq.token_ids.append(berlin[0])
    assert seq.banned_bad_words() == [berlin[1]]


def test_deterministic_mode_is_batch_invariant_with_bias() -> None:
    det = LLM(deterministic=True, kv_cache_memory="64MiB")
    params = SamplingParams(
        temperature=0.9, seed=5, max_tokens=6, logit_bias={COMMA: 3.0}, logprobs=2
    )
    alone = det.generate(PROMPT, params)[0]
    batch = det.generate(
        ["Hello, my name is", PROMPT, "def add(a, b):"],
        [SamplingParams(max_tokens=6), params, SamplingParams(max_tokens=6)],
    )[1]
    assert batch.token_ids == alone.token_ids
    assert [e.logprob for e in batch.logprobs] == [e.logprob for e in alone.logprobs]
    plain = det.generate(PROMPT, SamplingParams(temperature=0.9, seed=5, max_tokens=6))[0]
    assert plain.token_ids != alone.token_ids  # the bias took effect


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {1.5: 1}}, "logit_bias"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {5: -100.5}}, "logit_bias"),
        ({"logit_bias": {5: True}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": [5]}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": ["5"]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words": "Paris"}, "bad_words"),
    ],
)
def test_bad_values_name_the_field(kw: dict, param: str) -> None:
    with pytest.raises(RequestError) as err:
        SamplingParams(**kw)
    assert err.value.param == param


def test_token_ids_outside_the_vocabulary(llm: LLM) -> None:
    for kw, param in (
        ({"logit_bias": {49152: 1}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"allowed_token_ids": [5, 10**9]}, "allowed_token_ids"),
    ):
        with pytest.raises(RequestError) as err:
            llm.generate(PROMPT, SamplingParams(**kw))  # type: ignore[arg-type]
        assert err.value.param == param


# -- over HTTP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(llm: LLM) -> Iterator[OpenAI]:
    with serve_in_thread(create_app(AsyncEngine(llm.engine))) as running:
        running: RunningServer
        with OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
            yield c


def test_http_completions_and_chat(client: OpenAI, llm: LLM) -> None:
    kw = {"model": "smollm2-135m", "temperature": 0, "max_tokens": 4}
    plain = client.completions.create(prompt=PROMPT, **kw)
    down = client.completions.create(prompt=PROMPT, logit_bias={str(SPACE_PARIS): -100}, **kw)
    assert plain.choices[0].text.startswith(" Paris") and "Paris" not in down.choices[0].text
    up = client.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], n=2, logit_bias={str(COMMA): 100}, **kw
    )
    assert [c.message.content for c in up.choices] == [",,,,", ",,,,"]
    extras = client.chat.completions.create(
        messages=[{"role": "user", "content": "Name a city in France."}],
        extra_body={"bad_words": ["Paris"], "allowed_token_ids": [COMMA, SPACE_PARIS, PARIS, 30]},
        **kw,
    )
    assert set(extras.choices[0].message.content) <= {",", "."}
    choice = client.completions.create(
        prompt=PROMPT,
        logit_bias={str(llm.tokenizer.encode("no", add_special_tokens=False)[0]): 100},
        extra_body={"guided_choice": ["yes", "no"]},
        **kw,
    )
    assert choice.choices[0].text == "no"


@pytest.mark.parametrize(
    "body",
    [
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"5": 300}},
        {"logit_bias": {"5": "high"}},
        {"logit_bias": {"99999999": 1}},
        {"allowed_token_ids": []},
    ],
)
def test_http_bad_values_are_400s(client: OpenAI, body: dict) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2-135m", prompt=PROMPT, extra_body=body)
    assert (err.value.param or "").split(".")[0] in ("logit_bias", "allowed_token_ids")
