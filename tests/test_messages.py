"""One message normalizer on every path to a chat template (issue 12, defect 11)."""

from __future__ import annotations

import pytest

from llmos import LLM, SamplingParams
from llmos.backends import toolprompt
from llmos.backends.base import ChatRequest
from llmos.errors import RequestError
from llmos.models.messages import normalize

SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
DEVELOPER = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
PARTS = [
    {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
]


def test_developer_and_text_parts_normalize_to_system_and_text() -> None:
    assert normalize(DEVELOPER) == SYSTEM
    assert normalize(PARTS) == SYSTEM
    assert DEVELOPER[0]["role"] == "developer"  # the caller's messages are not changed


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content",
        ),
        ([{"role": "user", "content": 7}], "messages[0].content"),
    ],
)
def test_bad_messages_name_the_field(messages: list[dict], param: str) -> None:
    with pytest.raises(RequestError) as err:
        normalize(messages)
    assert err.value.param == param


def test_llm_chat_reads_developer_as_system(llm: LLM) -> None:
    """LLM.chat used to pass `developer` to the template, which rendered a role SmolLM2 never
    saw; the server mapped it to system. Now both see one prompt."""
    tok = llm.tokenizer
    params = SamplingParams(temperature=0, max_tokens=8)
    as_system = llm.chat(SYSTEM, params)[0]
    for messages in (DEVELOPER, PARTS):
        out = llm.chat(messages, params)[0]
        assert out.prompt_token_ids == as_system.prompt_token_ids
        assert out.token_ids == as_system.token_ids
    assert "developer" not in tok.decode(as_system.prompt_token_ids)


def test_the_text_tool_prompt_uses_the_same_normalizer() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = ChatRequest(DEVELOPER, tools)
    rendered = toolprompt.render(request.messages, request.tools, request.tool_choice)
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.")
    assert [m["role"] for m in rendered] == ["system", "user"]
