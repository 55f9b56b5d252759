"""Structured output that always completes inside `max_tokens` (llmos/engine/closing.py): on the
real model at temperature 1.5, over generated schemas with unbounded strings and patterns, for
tool-call arguments, and through the real HTTP server with the official `openai` client."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import llguidance
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from openai import OpenAI
from test_server import MODEL, client, reference, server  # noqa: F401 - fixtures

from llmos import LLM, SamplingParams
from llmos.engine.closing import complete
from llmos.engine.structured import json_schema_grammar
from llmos.errors import RequestError

ASK = [{"role": "user", "content": "Write a long, detailed profile of a person, as JSON."}]
EMAIL = r"^[a-z]+@[a-z]+\.com$"
PATTERNS = [
    EMAIL,
    r"^[A-Z][a-z]+( [A-Z][a-z]+)*$",
    r"^[a-z0-9_]+$",
    r"^https?://[a-z]+\.[a-z]{2,}(/[a-z]+)*$",
    r"^[0-9]+(\.[0-9]+)*$",
]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "email": {"type": "string", "pattern": EMAIL}},
    "required": ["name", "email"],
}
NOTE = {
    "type": "function",
    "function": {
        "name": "save_note",
        "description": "Save a long note about a person",
        "parameters": {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "body": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["title", "body", "tags"],
        },
    },
}
NEEDS = re.compile(r"needs at least (\d+) tokens")


# -- schemas where a free model runs on: unbounded strings and patterns ---------------------------
STRINGS = st.one_of(
    st.just({"type": "string"}),
    st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
    st.integers(1, 12).map(lambda n: {"type": "string", "minLength": n}),
)
LEAVES = st.one_of(
    STRINGS,
    STRINGS,
    st.just({"type": "integer"}),
    st.just({"type": "boolean"}),
    st.just({"enum": ["red", "green", "blue"]}),
)


def objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, Any], required: list[bool]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": props,
            "required": [k for k, r in zip(props, required, strict=True) if r],
        }

    names = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)
    return st.dictionaries(names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.builds(
            build,
            st.just(props),
            st.lists(st.booleans(), min_size=len(props), max_size=len(props)),
        )
    )


def arrays(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda items, low: {"type": "array", "items": items, "minItems": low},
        children,
        st.integers(0, 1),
    )


SCHEMAS = objects(st.recursive(LEAVES, lambda c: st.one_of(objects(c), arrays(c)), max_leaves=4))


def needed(llm: LLM, prompt: Any, chat: bool = False, **kwargs: Any) -> int:
    """The fewest tokens the constraint needs, from the refusal of max_tokens=1 (1 if none)."""
    params = SamplingParams(max_tokens=1, **kwargs.pop("params", {}))
    try:
        out = llm.chat(prompt, params, **kwargs) if chat else llm.generate(prompt, params)
    except RequestError as exc:
        assert exc.param == "max_tokens", exc
        found = NEEDS.search(str(exc))
        assert found, str(exc)
        return int(found.group(1))
    assert out[0].finish_reason in ("stop", "tool_calls"), out[0].text
    return 1


# -- the guarantee ------------------------------------------------------------------------------
@settings(
    max_examples=10,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # an example costs seconds: no shrinking
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schema=SCHEMAS, extra=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_every_output_validates_with_finish_reason_stop(
    llm: LLM, schema: dict[str, Any], extra: int, seed: int
) -> None:
    note(json.dumps(schema))
    prompt = llm.tokenizer.encode_chat(ASK)
    need = needed(llm, prompt, params={"json_schema": schema})
    params = SamplingParams(
        temperature=1.5, seed=seed, n=4, max_tokens=need + extra, json_schema=schema
    )
    for out in llm.generate(prompt, params)[0].outputs:
        assert out.finish_reason == "stop", (schema, need + extra, out.text)
        assert len(out.token_ids) <= need + extra
        jsonschema.validate(json.loads(out.text), schema)


def test_too_small_is_refused_and_exactly_enough_completes(llm: LLM) -> None:
    need = needed(llm, ASK, chat=True, params={"json_schema": PERSON})
    assert 8 <= need <= 24, need  # {"name": "", "email": "a@a.com"} and its tokens
    with pytest.raises(RequestError, match=f"max_tokens is {need - 1}.*at least {need}") as info:
        llm.chat(ASK, SamplingParams(max_tokens=need - 1, json_schema=PERSON))
    assert info.value.param == "max_tokens"
    for max_tokens in (need, need + 3):
        params = SamplingParams(
            temperature=1.5, seed=1, n=6, max_tokens=max_tokens, json_schema=PERSON
        )
        for out in llm.chat(ASK, params)[0].outputs:
            assert out.finish_reason == "stop" and len(out.token_ids) <= max_tokens
            jsonschema.validate(json.loads(out.text), PERSON)


def test_an_ample_budget_leaves_greedy_output_unchanged(llm: LLM) -> None:
    """Far from max_tokens nothing is steered: the same greedy output at 100 and 400."""
    outs = [
        llm.chat(ASK, SamplingParams(temperature=0, max_tokens=m, json_schema=PERSON))[0]
        for m in (100, 400)
    ]
    assert outs[0].finish_reason == outs[1].finish_reason == "stop"
    assert outs[0].token_ids == outs[1].token_ids
    assert len(outs[0].token_ids) < 100 - 48  # well before the window


def test_opening_a_large_optional_part_cannot_outrun_the_budget(llm: LLM) -> None:
    """The shortest completion is tiny (`{}`), but one freely sampled key opens ~30 required
    tokens: narrowing starts early enough (the grammar's reach) that it still closes."""
    inner = {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string", "pattern": EMAIL} for i in range(4)},
        "required": [f"field_{i}" for i in range(4)],
    }
    schema = {"type": "object", "properties": {"profile": inner, "note": {"type": "string"}}}
    need = needed(llm, ASK, chat=True, params={"json_schema": schema})
    assert need <= 3, need
    for extra in (20, 33):
        params = SamplingParams(
            temperature=1.5, seed=extra, n=6, max_tokens=need + extra, json_schema=schema
        )
        for out in llm.chat(ASK, params)[0].outputs:
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), schema)


def test_the_plan_completes_patterns_from_inside_them(llm: LLM) -> None:
    """The closing search from mid-pattern states: every plan it finds is valid."""
    grammars = llm.engine.grammars
    g = json_schema_grammar(PERSON, "json_schema")
    for head in ['{"name": "Al', '{"name": "Al", "email": "bo', '{"name": "", "email": "x@y']:
        m = llguidance.LLMatcher(grammars.llg_tokenizer, g, log_level=0)
        ids = llm.tokenizer.encode(head)
        assert m.try_consume_tokens(ids) == len(ids)
        plan = complete(m, grammars.closing_vocab)
        assert plan is not None and len(plan) <= 12, plan
        assert m.try_consume_tokens(plan) == len(plan) and m.is_stopped()
        jsonschema.validate(json.loads(llm.tokenizer.decode(ids + plan)), PERSON)


def test_tool_call_arguments_complete_inside_max_tokens(llm: LLM) -> None:
    kwargs = {"tools": [NOTE], "tool_choice": "required"}
    need = needed(llm, ASK, chat=True, **kwargs)
    for max_tokens in (need, need + 8):
        params = SamplingParams(temperature=1.5, seed=5, n=4, max_tokens=max_tokens)
        for out in llm.chat(ASK, params, **kwargs)[0].outputs:
            assert out.finish_reason == "tool_calls", out.text
            (call,) = out.tool_calls or []
            assert call.name == "save_note"
            jsonschema.validate(call.arguments, NOTE["function"]["parameters"])


# -- over HTTP, with the official client --------------------------------------------------------
def test_http_json_schema_completes_and_a_too_small_budget_is_a_400(
    client: OpenAI,  # noqa: F811
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format=fmt,
            max_tokens=4,  # type: ignore[arg-type]
        )
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body.get("param") == "max_tokens", body
    need = int(NEEDS.search(str(body.get("message"))).group(1))  # type: ignore[union-attr]
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format=fmt,  # type: ignore[arg-type]
        max_tokens=need + 4,
        temperature=1.5,
        n=4,
        seed=11,
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)
    assert r.usage is not None and r.usage.completion_tokens <= 4 * (need + 4)


def test_http_tool_call_completes_inside_max_tokens(client: OpenAI) -> None:  # noqa: F811
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[NOTE],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=40,
        temperature=1.5,
        n=3,
        seed=2,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls or []
        jsonschema.validate(json.loads(call.function.arguments), NOTE["function"]["parameters"])


def test_http_streamed_json_schema_completes(client: OpenAI) -> None:  # noqa: F811
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            response_format=fmt,  # type: ignore[arg-type]
            max_tokens=3,
            stream=True,
        )
    assert isinstance(info.value.body, dict) and info.value.body.get("param") == "max_tokens"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            response_format=fmt,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=1.5,
            seed=4,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(text), PERSON)
