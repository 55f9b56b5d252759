"""Structured output on the real model: JSON schemas (property-based), regexes, Lark grammars,
choices, refusals, batching beside free requests, preemption, and tool calls via `LLM.chat`."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from llmos import LLM, SamplingParams
from llmos.engine.tool_calls import ChatTools, prepare_chat, scan_calls
from llmos.errors import RequestError

SEEDS = range(10)
ASK_JSON = [{"role": "user", "content": "Reply with a JSON object."}]


# -- the supported subset, as hypothesis strategies -----------------------------------------------
def _range(kind: str, low: int, span: int) -> dict[str, Any]:
    return {"type": kind, "minimum": low, "maximum": low + span}


NAMES = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)
LEAVES = st.one_of(
    st.builds(_range, st.just("integer"), st.integers(-100, 100), st.integers(0, 1000)),
    st.builds(_range, st.just("number"), st.integers(-100, 100), st.integers(1, 1000)),
    st.builds(
        lambda low, extra: {"type": "string", "minLength": low, "maxLength": low + extra},
        st.integers(0, 3),
        st.integers(0, 8),
    ),
    st.sampled_from(
        [r"^[a-z]{1,6}$", r"^[A-Z][a-z]{1,5}$", r"^[0-9]{3}-[0-9]{4}$", r"^(red|green|blue)$"]
    ).map(lambda p: {"type": "string", "pattern": p}),
    st.lists(
        st.one_of(
            st.text("abcdefghij ", min_size=1, max_size=8),
            st.integers(-9, 99),
            st.booleans(),
            st.none(),
        ),
        min_size=1,
        max_size=4,
        unique=True,
    ).map(lambda values: {"enum": values}),
    st.just({"type": "boolean"}),
)


def objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with 1-3 properties, some required, and sometimes `additionalProperties: false`."""

    def build(props: dict[str, Any], required: list[bool], closed: bool) -> dict[str, Any]:
        schema = {
            "type": "object",
            "properties": props,
            "required": [k for k, r in zip(props, required, strict=True) if r],
        }
        return {**schema, "additionalProperties": False} if closed else schema

    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.builds(
            build,
            st.just(props),
            st.lists(st.booleans(), min_size=len(props), max_size=len(props)),
            st.booleans(),
        )
    )


def arrays(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda items, low, extra: {
            "type": "array",
            "items": items,
            "minItems": low,
            "maxItems": low + extra,
        },
        children,
        st.integers(0, 2),
        st.integers(0, 1),
    )


SCHEMAS = objects(st.recursive(LEAVES, lambda c: st.one_of(objects(c), arrays(c)), max_leaves=4))


def ten_seeds(
    llm: LLM, prompt: list[int], max_tokens: int, seeds: range = SEEDS, **constraint: Any
) -> list[Any]:
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, **constraint) for s in seeds
    ]
    return llm.generate([prompt] * len(params), params)


@settings(
    max_examples=8,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # an example costs seconds: no shrinking
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schema=SCHEMAS)
def test_every_output_validates_against_its_schema(llm: LLM, schema: dict[str, Any]) -> None:
    prompt = llm.tokenizer.encode_chat(ASK_JSON)
    for out in ten_seeds(llm, prompt, 200, json_schema=schema):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_regex_choice_and_lark_grammar(llm: LLM) -> None:
    prompt = llm.tokenizer.encode("My phone number is")
    for out in ten_seeds(llm, prompt, 20, regex=r" ?[0-9]{3}-[0-9]{4}"):
        assert re.fullmatch(r" ?[0-9]{3}-[0-9]{4}", out.text) and out.finish_reason == "stop"
    choices = ["Paris", "London", "a city I do not know"]
    for out in ten_seeds(llm, llm.tokenizer.encode("The capital of France is"), 10, choice=choices):
        assert out.text in choices and out.finish_reason == "stop"
    lark = 'start: answer "."\nanswer: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,2}/'
    for out in ten_seeds(llm, llm.tokenizer.encode("Is it raining?"), 10, grammar=lark):
        assert re.fullmatch(r"(yes|no|maybe [0-9]{1,2})\.", out.text), out.text


def test_json_object_and_schema_strings(llm: LLM) -> None:
    prompt = llm.tokenizer.encode_chat(ASK_JSON)
    for out in ten_seeds(llm, prompt, 60, range(4), json_object=True):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = llm.generate(prompt, SamplingParams(temperature=0, json_schema=json.dumps(schema)))[0]
    assert json.loads(out.text) in ({"ok": True}, {"ok": False})


def test_a_cut_grammar_says_length(llm: LLM) -> None:
    schema = {
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 200}},
        "required": ["story"],
    }
    out = llm.chat(ASK_JSON, SamplingParams(temperature=0, max_tokens=6, json_schema=schema))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert out.text.startswith('{"story": "')


@pytest.mark.parametrize(
    ("schema", "keyword", "param"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems", "json_schema.uniqueItems"),
        (
            {"type": "object", "properties": {"tags": {"type": "array", "contains": {"const": 1}}}},
            "contains",
            "json_schema.properties.tags.contains",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "format": "zip-code"}}},
            "format",
            "json_schema.properties.a.format",
        ),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if", "json_schema.if"),
        ({"type": "string", "pattern": "(?=a)b"}, "pattern", "json_schema.pattern"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf", "json_schema.oneOf"),
    ],
)
def test_an_unsupported_keyword_is_refused_by_name(
    llm: LLM, schema: dict[str, Any], keyword: str, param: str
) -> None:
    with pytest.raises(RequestError, match=keyword) as info:
        llm.generate("x", SamplingParams(json_schema=schema))
    assert info.value.param == param


def test_constraint_fields_are_checked(llm: LLM) -> None:
    with pytest.raises(RequestError, match="at most one") as info:
        SamplingParams(regex="a+", choice=["a"])
    assert info.value.param == "choice"
    for field, value in [
        ("json_schema", "{not json"),
        ("json_schema", [1]),
        ("choice", []),
        ("choice", ["a", 3]),
        ("regex", ""),
        ("grammar", "  "),
    ]:
        with pytest.raises(RequestError) as info:
            SamplingParams(**{field: value})
        assert info.value.param == field
    with pytest.raises(RequestError, match="regex") as info:
        llm.generate("x", SamplingParams(regex="[0-9"))
    assert info.value.param == "regex"
    with pytest.raises(RequestError) as info:
        llm.generate("x", SamplingParams(grammar="start: undefined_rule"))
    assert info.value.param == "grammar"


# -- beside free requests, and through preemption ----------------------------------------------
@pytest.fixture(scope="module")
def tight_llm() -> LLM:
    """Batch-invariant, with a cache too small for the test's batch: it must preempt."""
    return LLM(deterministic=True, num_kv_blocks=10, max_num_batched_tokens=32)


def test_constrained_beside_free_changes_neither(tight_llm: LLM) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=16, json_schema=schema)
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, " * 4,
        "Name and age of a person, as JSON: ",
        "A person record: " * 3,
    ]
    params = [free, free, free, constrained, constrained]
    alone = [tight_llm.generate(p, q)[0].token_ids for p, q in zip(prompts, params, strict=True)]
    preemptions = tight_llm.engine.scheduler.num_preemptions
    together = tight_llm.generate(prompts, params)
    assert tight_llm.engine.scheduler.num_preemptions > preemptions, "meant to preempt"
    assert [o.token_ids for o in together] == alone
    for out in together[3:]:
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)
    assert tight_llm.engine.blocks.num_used == 0


# -- tool calls through LLM.chat ----------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_choice_required_named_and_none(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=7, n=4, max_tokens=48)  # 4 random streams
    required = llm.chat(
        ASK_WEATHER, params, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False
    )[0]
    named = llm.chat(
        ASK_WEATHER,
        params,
        tools=[WEATHER, ADD],
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "add"}},
    )[0]
    plain = llm.chat(ASK_WEATHER, params, tools=[WEATHER, ADD], tool_choice="none")[0]
    for out in required.outputs:
        assert out.finish_reason == "tool_calls" and out.text == ""
        (call,) = out.tool_calls or []
        assert call.id.startswith("call_") and call.type == "function"
        schema = (WEATHER if call.name == "get_weather" else ADD)["function"]["parameters"]
        jsonschema.validate(call.arguments, schema)
    for out in named.outputs:
        assert [c.name for c in out.tool_calls or []] == ["add"]
        jsonschema.validate(out.tool_calls[0].arguments, ADD["function"]["parameters"])
    for out in plain.outputs:
        assert out.tool_calls is None and "<tool_call>" not in out.text


def test_auto_answers_or_calls_and_a_round_trip_renders(llm: LLM) -> None:
    for out in llm.chat(
        ASK_WEATHER, SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=64), tools=[WEATHER]
    )[0].outputs:
        if out.tool_calls:
            assert out.finish_reason == "tool_calls"
            assert all(c.name == "get_weather" for c in out.tool_calls)
        else:  # a plain answer never smuggles in a call
            assert "<tool_call>" not in out.text
    call = llm.chat(
        ASK_WEATHER,
        SamplingParams(temperature=0, max_tokens=48),
        tools=[WEATHER],
        tool_choice="required",
    )[0].tool_calls[0]
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [call.to_dict()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'},
    ]
    rendered, _, _ = prepare_chat(llm.tokenizer, history, [WEATHER], "auto")
    text = llm.tokenizer.apply_chat_template(rendered)
    assert (
        f'<tool_call>[{{"name": "get_weather", "arguments": {call.function.arguments}}}]'
        "</tool_call>" in text
    )
    assert '<|im_start|>tool\n{"temperature_c": 18}<|im_end|>' in text
    assert "<tools>" in text  # the tool list, in the system message
    answer = llm.chat(history, SamplingParams(temperature=0, max_tokens=24), tools=[WEATHER])[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")


def test_tool_fields_are_checked(llm: LLM) -> None:
    cases = [
        (
            [{"type": "function", "function": {"name": "bad name"}}],
            "auto",
            "tools[0].function.name",
        ),
        ([WEATHER, WEATHER], "auto", "tools[1].function.name"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"x": {"type": "array", "uniqueItems": True}},
                        },
                    },
                }
            ],
            "auto",
            "tools[0].function.parameters.properties.x.uniqueItems",
        ),
    ]
    for tools, choice, param in cases:
        with pytest.raises(RequestError) as info:
            llm.chat(ASK_WEATHER, tools=tools, tool_choice=choice)
        assert info.value.param == param


def test_scan_calls_reads_partial_and_whole_calls() -> None:
    body = (
        '[{"name": "add", "arguments": {"a": 1, "b": {"c": "}"}}}, {"name": "get_weather", '
        '"arguments": {"city": "Par'
    )
    first, second = scan_calls(body)
    assert (first.name, first.arguments, first.done) == ("add", '{"a": 1, "b": {"c": "}"}}', True)
    assert (second.name, second.arguments, second.done) == ("get_weather", '{"city": "Par', False)
    tools = ChatTools([WEATHER], "auto")
    assert tools.parse("Sunny.") == ("Sunny.", None)
    content, calls = tools.parse(
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
    )
    assert content is None and calls is not None and calls[0].arguments == {"city": "Oslo"}
    assert tools.parse('<tool_call>[{"name": "get_weather", "arg')[1] is None  # cut short
