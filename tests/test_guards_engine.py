"""Output guards in `LLM.generate` with the real model: the engine's output path holds back,
stops and redacts, and token ids and logprobs end where the released text ends."""

from __future__ import annotations

import asyncio

import pytest

from llmos import LLM, SamplingParams
from llmos.backends.local import LocalBackend
from llmos.engine.async_engine import AsyncEngine
from llmos.engine.guards import parse_guards
from llmos.errors import RequestError
from llmos.kernel.guards import judge_score

SECRET = "swordfish"
PROMPT = "The password is swordfish. I repeat, the password is"
HOLD_BACK = {"name": "no-secret", "kind": "regex", "pattern": "(?i)swordfish", "prevent": False}


def test_the_model_says_it_and_the_guard_stops_it(llm: LLM) -> None:
    plain = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))[0]
    assert SECRET in plain.text.lower()  # the model does say it
    guarded = llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=8, logprobs=0, guards=[HOLD_BACK])
    )[0]
    assert guarded.finish_reason == "content_filter"
    assert SECRET[:2] not in guarded.text.lower()
    assert SECRET[:2] not in llm.tokenizer.decode(guarded.token_ids).lower()
    assert len(guarded.logprobs or []) == len(guarded.token_ids)


def test_prevention_keeps_it_out_of_the_tokens(llm: LLM) -> None:
    block = {**HOLD_BACK, "prevent": True}
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, guards=[block]))[0]
    assert SECRET not in out.text.lower() and out.finish_reason == "length"
    schema = {"type": "object", "properties": {"password": {"type": "string"}}}
    params = SamplingParams(temperature=0, max_tokens=30, guards=[block], json_schema=schema)
    js = llm.generate(PROMPT, params)[0]
    assert js.text.startswith('{"password": "') and SECRET not in js.text.lower()


def test_redaction_and_n_choices(llm: LLM) -> None:
    guard = {"name": "pw", "kind": "literal", "value": "swordfish", "action": "redact"}
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, guards=[guard])
    out = llm.generate(PROMPT, params)[0]
    assert out.finish_reason == "length"
    assert out.text.startswith(" [REDACTED]") and SECRET not in out.text
    assert "swordf" not in llm.tokenizer.decode(out.token_ids)  # its tokens are left out
    assert len(out.logprobs or []) == len(out.token_ids)
    many = llm.generate(
        PROMPT, SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=6, guards=[HOLD_BACK])
    )[0]
    for o in many.outputs:  # each choice filtered on its own
        assert SECRET not in o.text.lower()
        assert o.finish_reason in ("content_filter", "length", "stop")


def test_a_judge_asks_a_backend_yes_or_no(llm: LLM) -> None:
    """The judge kind through a backend (the local engine): the answer is constrained to yes or
    no and the score is P(yes). In the engine's output stage a judge needs a scorer."""
    guard = parse_guards(
        [{"name": "rude", "stage": "tool_output", "kind": "judge", "question": "Is it rude?"}]
    )[0]
    engine = AsyncEngine(llm.engine)
    backend = LocalBackend(engine)
    try:

        async def scores() -> list[float]:
            texts = ["You are a stupid, worthless idiot.", "The weather is mild today."]
            return [await judge_score(backend, guard, t) for t in texts]

        values = asyncio.run(scores())
    finally:
        engine.shutdown()
    assert all(0.0 <= v <= 1.0 for v in values) and values[0] != values[1], values
    with pytest.raises(RequestError, match=r"guards\[0\]\.kind"):
        judge = {"name": "j", "kind": "judge", "question": "Is it rude?"}
        llm.generate("Hello", SamplingParams(max_tokens=2, guards=[judge]))
