"""OpenAI's Responses API in chat terms: a request becomes the `ChatCompletionRequest` a chat
completion would make (so the prompt, the tool grammar and the prefix cache are the same), and
the chat answer becomes Responses output items.

Input items map to chat messages: `message` items keep their role, `function_call` items join
the assistant message before them as `tool_calls`, and `function_call_output` items become
`tool` messages. `instructions` is a system message first. Hosted tools, reasoning, background
runs and the like are refused (400, naming the field), never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, Field

from llmos.errors import RequestError
from llmos.server.errors import APIError
from llmos.server.protocol import _INT64, ChatCompletionRequest, _Request

_TEXT_PARTS = ("input_text", "output_text", "text")
_ROLES = ("user", "system", "developer", "assistant")


class TextConfig(_Request):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    # (named apart from `tools`, which `fields` reads as chat's nested tools)
    function_tools: list[Any] | None = Field(None, alias="tools")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    include: list[str] | None = None
    # vLLM-style extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=2 * _INT64)
    priority: int = Field(0, ge=-_INT64, lt=_INT64)
    guards: list[dict[str, Any]] | None = None  # llmos safeguards, as on chat
    # read only to refuse them: this server cannot honour them
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    conversation: Any = None
    prompt: Any = None
    truncation: str | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    context_management: Any = None

    def check(self) -> None:
        """Refuse what this server cannot do, naming the field."""
        refusals = {
            "background": bool(self.background),
            "reasoning": any(v is not None for v in (self.reasoning or {}).values()),
            "conversation": self.conversation is not None,
            "prompt": self.prompt is not None,
            "truncation": self.truncation not in (None, "disabled"),
            "top_logprobs": bool(self.top_logprobs),
            "max_tool_calls": self.max_tool_calls is not None,
            "context_management": self.context_management is not None,
            "include": bool(self.include),
            "text.verbosity": self.text is not None and self.text.verbosity not in (None, "medium"),
        }
        for name, refused in refusals.items():
            if refused:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if isinstance(self.input, list) and not self.input and self.previous_response_id is None:
            raise APIError(400, "input must not be empty", param="input")
        if len(self.metadata or {}) > 16:
            raise APIError(400, "metadata holds at most 16 keys", param="metadata")

    def input_items(self) -> list[dict[str, Any]]:
        """`input` as a list of items (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return list(self.input)

    def chat_request(self, history: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat completion this request amounts to, `history` (earlier items) first."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += to_messages(history, "previous_response_id")
        messages += to_messages(self.input_items(), "input")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "tools": chat_tools(self.function_tools) if self.function_tools else None,
            "tool_choice": chat_tool_choice(self.tool_choice),
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": response_format(self.text.format if self.text else None),
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "user": self.user,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "priority": self.priority,
            "guards": self.guards,
        }
        with renamed():
            req = ChatCompletionRequest.model_validate(body)
            req.check()
        return req


# -- request pieces -----------------------------------------------------------------------------
def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of parts", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise APIError(
                400,
                f"{param}[{j}].type: {kind!r} parts are not supported; this model reads text "
                "only (input_text, output_text)",
                param=f"{param}[{j}].type",
            )
    return "\n".join(texts)


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{param}.{key} must be a string", param=f"{param}.{key}")
    return value


def to_messages(items: list[Any], where: str) -> list[dict[str, Any]]:
    """Chat messages from Responses input (or stored output) items."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        p = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{p} must be an object", param=p)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise APIError(
                    400, f"{p}.role must be one of {list(_ROLES)}, got {role!r}", param=f"{p}.role"
                )
            messages.append({"role": role, "content": _text(item.get("content"), f"{p}.content")})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", p),
                "type": "function",
                "function": {
                    "name": _string(item, "name", p),
                    "arguments": _string(item, "arguments", p),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item, "call_id", p),
                    "content": _text(item.get("output"), f"{p}.output"),
                }
            )
        else:
            raise APIError(
                400,
                f"{p}.type: {kind!r} items are not supported by this server (only message, "
                "function_call and function_call_output)",
                param=f"{p}.type",
            )
    return messages


def chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Responses function tools (flat) as chat tools (nested under `function`)."""
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(
                400,
                f"tools[{i}].type: {kind!r} tools are not supported by this server; only "
                "function tools (hosted tools such as web_search need OpenAI's servers)",
                param=f"tools[{i}].type",
            )
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function":
        raise APIError(
            400,
            f"tool_choice.type: {choice.get('type')!r} is not supported by this server; send "
            "'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
            param="tool_choice",
        )
    return {"type": "function", "function": {"name": choice.get("name")}}


def response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format`."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise APIError(
                400, "text.format.schema must be a JSON schema object", param="text.format.schema"
            )
        spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise APIError(
        400,
        f"text.format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param="text.format.type",
    )


_NAMES = [  # chat's field names → this API's, longest first
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
]
_MESSAGE = re.compile(r"\bmessages\[\d+\]")  # (its index counts instructions and history)


def rename(text: str, param: bool = False) -> str:
    if param and text == "prompt":
        return "input"
    if text.startswith("tools[") and ".function." in text:
        text = text.replace(".function.", ".", 1)
    text = _MESSAGE.sub("input", text)
    for chat, ours in _NAMES:
        if text.startswith(chat) or f" {chat}" in text:
            return text.replace(chat, ours, 1)
    return text


@contextmanager
def renamed() -> Iterator[None]:
    """Errors from the chat machinery, re-raised under this API's field names."""
    try:
        yield
    except RequestError as exc:
        err = APIError.from_request_error(exc)
        param = rename(err.param, param=True) if err.param else None
        raise APIError(400, rename(err.message), param=param, code=err.code) from exc
    except APIError as exc:
        exc.message = rename(exc.message)
        exc.args = (exc.message,)
        exc.param = rename(exc.param, param=True) if exc.param else None
        raise


# -- answers, as the OpenAPI document shows them (routes build them as dicts: responses_output)
class ResponseDeleted(BaseModel):
    id: str
    object: str = "response.deleted"
    deleted: bool = True


class ResponseObject(BaseModel):
    """The Response object, as the OpenAPI document shows it (routes build it as a dict)."""

    id: str
    object: str = "response"
    created_at: int
    status: str
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = {}
    model: str
    output: list[dict[str, Any]]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: str
    usage: dict[str, Any] | None = None
    user: str | None = None
