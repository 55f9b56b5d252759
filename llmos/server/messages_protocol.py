"""Anthropic's Messages wire format, translated into a chat completion request.

A Messages request becomes the `ChatCompletionRequest` that means the same thing: `system`
leads the conversation, `tool_use` blocks become an assistant turn's `tool_calls`, each
`tool_result` block a `tool` message, `tools`/`tool_choice` their OpenAI spellings and
`stop_sequences` the stop strings. From there the chat machinery (the template, the tool prompt
and grammar, sampling) runs unchanged. Content this model cannot read (images, documents,
thinking) is refused with a 400 that names the block, never dropped.

Errors come out in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`; each
message starts with the field it is about, in the Messages API's own names.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmos.server.errors import APIError
from llmos.server.protocol import ChatCompletionRequest

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
STOP_REASONS = {"length": "max_tokens", "abort": "end_turn"}  # "stop" depends on why


def error_body(err: APIError) -> dict[str, Any]:
    """The error as Anthropic's API sends it (the status picks the client's exception)."""
    fallback = "api_error" if err.status >= 500 else "invalid_request_error"
    kind = _ERROR_TYPES.get(err.status, fallback)
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        error_body(err), status_code=err.status, headers={**(err.headers or {}), **(headers or {})}
    )


def error_event(err: APIError) -> str:
    return f"event: error\ndata: {json.dumps(error_body(err))}\n\n"


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class Metadata(_Request):
    user_id: str | None = None


class OutputConfig(_Request):
    format: dict[str, Any] | None = None  # {"type": "json_schema", "schema": {...}}


class MessageParam(_Request):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Request):
    """`POST /v1/messages` (and, without `max_tokens`, `/v1/messages/count_tokens`)."""

    model: str
    messages: list[MessageParam]
    max_tokens: int | None = Field(None, ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False
    # not `tools`: fields.py reads a `tools` attribute as OpenAI's shape
    tool_defs: list[dict[str, Any]] | None = Field(None, alias="tools")
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    # prompt caching is automatic here (the prefix cache), so the breakpoint has nothing to add
    cache_control: dict[str, Any] | None = None

    def check(self, *, counting: bool = False) -> None:
        if self.max_tokens is None and not counting:
            raise APIError(400, "max_tokens: Field required", param="max_tokens")
        if not self.messages:
            raise APIError(400, "messages: at least one message is required", param="messages")
        kind = (self.thinking or {}).get("type", "disabled")
        if kind != "disabled":
            raise APIError(
                400,
                f"thinking: {kind!r} is not supported; this model does not think before it "
                "answers (send {'type': 'disabled'} or leave thinking out)",
                param="thinking",
            )

    def to_chat(self) -> tuple[ChatCompletionRequest, str | None]:
        """The chat completion request this means, and the prefill (a final assistant turn's
        text, which the reply continues) if there is one."""
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": _system_text(self.system)})
        for i, m in enumerate(self.messages):
            messages += _chat_messages(m, i)
        prefill = None
        if self.messages[-1].role == "assistant":
            last = messages[-1]
            if last.get("tool_calls"):
                raise APIError(
                    400,
                    f"messages[{len(self.messages) - 1}]: a final assistant turn with tool_use "
                    "blocks needs their tool_result in a user turn after it",
                )
            prefill = last["content"] or None
            if prefill is None:  # an empty final turn: the reply is a turn of its own
                messages.pop()
            elif prefill != prefill.rstrip():
                raise APIError(
                    400, "messages: final assistant content cannot end with trailing whitespace"
                )
        tools = [_tool(t, i) for i, t in enumerate(self.tool_defs)] if self.tool_defs else None
        choice, parallel = _tool_choice(self.tool_choice, tools)
        body: dict[str, Any] = {
            "response_format": self._response_format(),
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stop": self.stop_sequences or None,
            # the stop string stays in the text, to name it in `stop_sequence` (then cut)
            "include_stop_str_in_output": bool(self.stop_sequences),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k if self.top_k else None,
            "user": self.metadata.user_id if self.metadata else None,
            "stream": self.stream,
            "tools": tools,
            "tool_choice": choice,
            "parallel_tool_calls": parallel,
            "add_generation_prompt": prefill is None,
        }
        return ChatCompletionRequest.model_validate(body), prefill

    def _response_format(self) -> dict[str, Any] | None:
        fmt = self.output_config.format if self.output_config else None
        if fmt is None:
            return None
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise APIError(
                400,
                "output_config.format: must be {'type': 'json_schema', 'schema': {...}}",
                param="output_config.format",
            )
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def _system_text(system: str | list[dict[str, Any]]) -> str:
    if isinstance(system, str):
        return system
    texts = []
    for j, block in enumerate(system):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(
                400,
                f"system[{j}].type: only text blocks are supported in system, "
                f"got {block.get('type')!r}",
                param=f"system[{j}].type",
            )
        texts.append(block["text"])
    return "\n".join(texts)


_UNSUPPORTED = {
    "image": "images",
    "document": "documents",
    "thinking": "thinking blocks",
    "redacted_thinking": "thinking blocks",
    "search_result": "search results",
    "server_tool_use": "server tools",
    "web_search_tool_result": "server tools",
    "container_upload": "files",
}


def _block_error(i: int, j: int, kind: Any, role: str) -> APIError:
    where = f"messages[{i}].content[{j}].type"
    if kind in _UNSUPPORTED:
        return APIError(
            400,
            f"{where}: {_UNSUPPORTED[kind]} are not supported; this model reads text only",
            param=where,
        )
    allowed = "text, tool_use" if role == "assistant" else "text, tool_result"
    return APIError(
        400, f"{where}: {kind!r} blocks are not allowed in {role} turns ({allowed})", param=where
    )


def _chat_messages(m: MessageParam, i: int) -> list[dict[str, Any]]:
    """One Messages turn as chat messages: text and tool_use in one assistant message; a user
    turn's tool_result blocks each a `tool` message, its text a user message, in order."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    if not m.content:
        where = f"messages[{i}].content"
        raise APIError(400, f"{where}: at least one content block is required", param=where)
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []

    def flush_user_text() -> None:
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
            texts.clear()

    for j, block in enumerate(m.content):
        kind = block.get("type")
        where = f"messages[{i}].content[{j}]"
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise APIError(400, f"{where}.text: Field required", param=f"{where}.text")
            texts.append(block["text"])
        elif kind == "tool_use" and m.role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("id"), str):
                raise APIError(
                    400, f"{where}: tool_use needs a string id and name", param=f"{where}.id"
                )
            if not isinstance(block.get("input", {}), dict):
                raise APIError(400, f"{where}.input: must be an object", param=f"{where}.input")
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {
                        "name": block["name"],
                        "arguments": json.dumps(block.get("input", {})),
                    },
                }
            )
        elif kind == "tool_result" and m.role == "user":
            flush_user_text()
            if not isinstance(block.get("tool_use_id"), str):
                raise APIError(
                    400, f"{where}.tool_use_id: Field required", param=f"{where}.tool_use_id"
                )
            content = _result_text(block.get("content", ""), where)
            if block.get("is_error"):
                content = f"Error: {content}"
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": content})
        else:
            raise _block_error(i, j, kind, m.role)
    if m.role == "assistant":
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            message["tool_calls"] = calls
        return [message]
    flush_user_text()
    return out


def _result_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(
            400, f"{where}.content: a string or a list of text blocks", param=f"{where}.content"
        )
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = _UNSUPPORTED.get(kind, f"{kind!r} blocks")  # type: ignore[arg-type]
            raise APIError(
                400,
                f"{where}.content[{k}].type: {what} are not supported in a tool_result; "
                "this model reads text only",
                param=f"{where}.content[{k}].type",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """An Anthropic client tool as OpenAI's function tool (server tools are refused)."""
    kind = tool.get("type", "custom")
    if kind != "custom":
        raise APIError(
            400,
            f"tools[{i}].type: {kind!r} is a server tool, which this server does not run; "
            "define it as a client tool (name, description, input_schema)",
            param=f"tools[{i}].type",
        )
    if "input_schema" not in tool:
        where = f"tools[{i}].input_schema"
        raise APIError(400, f"{where}: Field required", param=where)
    fn = {"name": tool.get("name"), "parameters": tool["input_schema"]}
    if tool.get("description") is not None:
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def _tool_choice(
    choice: dict[str, Any] | None, tools: list[dict[str, Any]] | None
) -> tuple[Any, bool]:
    """(OpenAI's tool_choice, parallel_tool_calls)."""
    if choice is None:
        return ("auto" if tools else None), True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        if not tools:
            raise APIError(400, "tool_choice: 'any' needs tools", param="tool_choice")
        return "required", parallel
    if kind == "tool":
        names = [t["function"]["name"] for t in tools or []]
        if choice.get("name") not in names:
            raise APIError(
                400,
                f"tool_choice.name: {choice.get('name')!r} is not in tools ({names})",
                param="tool_choice.name",
            )
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise APIError(
        400,
        f"tool_choice.type: must be 'auto', 'any', 'tool' or 'none', got {kind!r}",
        param="tool_choice.type",
    )


_RENAMES = [  # the chat request's field names → the Messages request's
    (re.compile(r"^tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
    (re.compile(r"^tools\[(\d+)\]\.function\.name"), r"tools[\1].name"),
    (re.compile(r"^tools\[(\d+)\]\.function"), r"tools[\1]"),
    (re.compile(r"^stop\b"), "stop_sequences"),
    (re.compile(r"^user\b"), "metadata.user_id"),
    (re.compile(r"^response_format\.json_schema\.schema"), "output_config.format.schema"),
    (re.compile(r"^response_format"), "output_config.format"),
]


def renamed(err: APIError) -> APIError:
    """An error the chat machinery raised, under the Messages API's names for its fields."""
    param = err.param or ""
    for pattern, new in _RENAMES:
        if pattern.match(param):
            new_param = pattern.sub(new, param, count=1)
            message = err.message.replace(param, new_param, 1)
            if message == err.message and not message.startswith(new_param):
                message = f"{new_param}: {message}"
            return APIError(err.status, message, param=new_param, code=err.code)
    if param and not err.message.startswith(param):
        return APIError(err.status, f"{param}: {err.message}", param=param, code=err.code)
    return err
