"""Tool calling for chat: tools in the prompt, a grammar that admits an answer or calls, and the
calls parsed back out (`scan_calls` also serves streams: see llmos/server/streaming.py).

The format llmos uses when the chat template does not render `tools` (SmolLM2-135M's does not;
this is close to the format SmolLM2 was tuned on). The tool list ends the system message (one is
added when the conversation has none):

    You can call these tools:
    <tools>[{"name": "get_weather", "description": "...", "parameters": {...}}]</tools>
    To call tools, reply with only a JSON list of calls between <tool_call> and </tool_call>:
    <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>
    Otherwise, answer the user directly.

A reply is then either a plain answer, which may not contain `<tool_call>`, or exactly
`<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>` with one object per call (one
only, unless `parallel_tool_calls`), each valid against its function's parameter schema. With
`tool_choice` "required" or a named function only calls are admitted; the grammar alone
enforces the choice, so the system message is the same whatever the choice, and an agent whose
choice changes between turns still finds its whole conversation in the prefix cache. Earlier
turns render the same way: an assistant message's `tool_calls` become that text after its
content, and a `tool` message keeps its role and content.

A template that renders `tools` itself gets them, and the history, as Hugging Face passes them
(assistant `tool_calls` with object arguments); if it speaks Hermes' format (`<tool_call>`, as
Qwen2.5's does) calls are `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` each.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

from llmos.engine.sampling import SamplingParams
from llmos.engine.sequence import CompletionOutput, FunctionCall, ToolCall
from llmos.engine.structured import checked_grammar, json_schema_grammar, styled_schema
from llmos.errors import RequestError
from llmos.models.messages import normalize
from llmos.models.tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_PROBE = [
    {
        "type": "function",
        "function": {
            "name": "llmos_probe",
            "description": "probe",
            "parameters": {"type": "object"},
        },
    }
]
_NATIVE: dict[str, bool] = {}  # chat template source → whether it renders `tools`


# An answer holds no call syntax, not even a look-alike: no tag that starts `<tool` then a
# character that is not a letter (`<tool_call`, `<tool>`, `<tool:get_weather>`...), `<tools` or
# `<toolcall`, in any case, opening or closing (`<toolbar>` is fine), and no call object's head
# (`{"name": "...", "arguments"`).
# With "none" no call can be made at all (small models, seeing the tools in the prompt, write
# `<tool_call_2>`, `<tool_request>[{"name": ..., "arguments": ...}]</tool_call>` and the like);
# with "auto" a reply that starts `<tool_` can only go on as a real call.
LOOKALIKE = (
    r"<\/?[tT][oO][oO][lL](?:[^a-zA-Z]|[sS]|[cC][aA][lL][lL])"
    r'|\{\s*"name"\s*:\s*"(?:[^"\\]|\\.)*"\s*,\s*"arguments"'
)
ANSWER_TEXT = f"TEXT: /(?s:.*)/ & ~/(?s:.*)(?:{LOOKALIKE})(?s:.*)/"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def renders_tools(tokenizer: Tokenizer) -> bool:
    """Whether the model's chat template uses `tools` (rendering with and without differs)."""
    source = tokenizer.chat_template
    if source is None:
        return False
    if source not in _NATIVE:
        probe = [{"role": "user", "content": "hi"}]
        try:
            _NATIVE[source] = tokenizer.apply_chat_template(
                probe, tools=_PROBE
            ) != tokenizer.apply_chat_template(probe)
        except Exception:  # noqa: BLE001 - a template that chokes on tools does not render them
            _NATIVE[source] = False
    return _NATIVE[source]


# -- request fields ------------------------------------------------------------------------------
def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools`, checked (each bad field named), with `parameters` defaulted."""
    if not isinstance(tools, list):
        raise RequestError(
            "tools must be a list of {'type': 'function', 'function': {...}}", param="tools"
        )
    out, seen = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise RequestError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}",
                param=f"tools[{i}]",
            )
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RequestError(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                param=f"tools[{i}].function.name",
            )
        if name in seen:
            raise RequestError(
                f"tools[{i}].function.name: {name!r} is defined twice",
                param=f"tools[{i}].function.name",
            )
        seen.add(name)
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        json_schema_grammar(parameters, f"tools[{i}].function.parameters")
        out.append({"type": "function", "function": {**fn, "parameters": parameters}})
    return out


def check_tool_choice(tool_choice: Any, names: list[str]) -> str | None:
    """'auto', 'required' or a function name; None for 'none' (or no tools)."""
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type", "function") != "function" or name not in names:
            raise RequestError(
                f"tool_choice names no tool in `tools` (got {name!r}; tools: {names})",
                param="tool_choice",
            )
        return name
    if tool_choice not in ("auto", "none", "required"):
        raise RequestError(
            "tool_choice must be 'auto', 'none', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}, got "
            f"{tool_choice!r}",
            param="tool_choice",
        )
    if tool_choice == "required" and not names:
        raise RequestError("tool_choice 'required' needs tools", param="tool_choice")
    return None if tool_choice == "none" or not names else tool_choice


# -- the prompt ----------------------------------------------------------------------------------
def _arguments(raw: Any) -> Any:
    """A past call's arguments as an object (OpenAI sends JSON text; templates want objects)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _calls_text(calls: list[dict[str, Any]], hermes: bool) -> str:
    items = [
        {
            "name": (c.get("function") or {}).get("name"),
            "arguments": _arguments((c.get("function") or {}).get("arguments")),
        }
        for c in calls
    ]
    if hermes:
        return "\n".join(f"{OPEN}\n{json.dumps(item)}\n{CLOSE}" for item in items)
    return f"{OPEN}{json.dumps(items)}{CLOSE}"


PROMPT_ENUM_MAX = 40  # enum values shown in the tool prompt; the grammar enforces them all


def elide_enums(schema: Any) -> Any:
    """The schema as the prompt shows it: an `enum` longer than PROMPT_ENUM_MAX keeps its first
    values and says how many it has, so 10k paths do not fill the context (the grammar, built
    from the full schema, still admits exactly them)."""
    if isinstance(schema, list):
        return [elide_enums(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: elide_enums(v) for k, v in schema.items() if k != SKIP}
    enum = schema.get("enum")
    if isinstance(enum, list) and len(enum) > PROMPT_ENUM_MAX:
        out["enum"] = enum[:PROMPT_ENUM_MAX]
        note = f"one of {len(enum)} values, the first {PROMPT_ENUM_MAX} shown"
        out["description"] = (
            f"{schema['description']} ({note})" if schema.get("description") else note
        )
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and len(pattern) > 200:
        out["pattern"] = pattern[:200] + "..."
    return out


SKIP = "x-llmos-skip"  # enum values the grammar leaves out; the prompt still lists them


def skip_enums(schema: Any) -> Any:
    """The schema as the grammar enforces it: an `enum` minus its `x-llmos-skip` values (a
    caller's way to rule out values, e.g. a read already made, without changing the prompt, so
    the conversation's cached KV still matches), unless that would leave none."""
    if isinstance(schema, list):
        return [skip_enums(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: skip_enums(v) for k, v in schema.items() if k != SKIP}
    enum, skip = schema.get("enum"), schema.get(SKIP)
    if isinstance(enum, list) and isinstance(skip, list):
        left = [v for v in enum if v not in skip]
        out["enum"] = left or enum
    return out


def _tool_prompt(tools: list[dict[str, Any]], parallel: bool) -> str:
    shown = [
        {**t["function"], "parameters": elide_enums(t["function"]["parameters"])} for t in tools
    ]
    lines = [
        "You can call these tools:",
        f"<tools>{json.dumps(shown)}</tools>",
        f"To call tools, reply with only a JSON list of calls between {OPEN} and {CLOSE}:",
        f'{OPEN}[{{"name": "tool_name", "arguments": {{"arg": "value"}}}}]{CLOSE}',
        "Otherwise, answer the user directly.",
    ]
    if not parallel:
        lines.append("Make one call at a time.")
    return "\n".join(lines)


def render_messages(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    calls: ChatTools | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, template kwargs) ready for the chat template, tools and past calls included."""
    native = renders_tools(tokenizer)
    hermes = native and OPEN in (tokenizer.chat_template or "")
    out = []
    for m in normalize(messages):
        m = {**m, "content": m.get("content") or ""}
        past = m.pop("tool_calls", None)
        if past and native:
            m["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": _arguments(c["function"].get("arguments")),
                    },
                }
                for c in past
            ]
        elif past:
            m["content"] += _calls_text(past, hermes)
        out.append(m)
    if native:
        shown = [
            {
                **t,
                "function": {
                    **t["function"],
                    "parameters": elide_enums(t["function"]["parameters"]),
                },
            }
            for t in tools or []
        ]
        return out, ({"tools": shown} if shown else {})
    if calls is not None:
        prompt = _tool_prompt(calls.tools, calls.parallel)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def prepare_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: Any = None,
    tool_choice: Any = "auto",
    parallel_tool_calls: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any], ChatTools | None]:
    """Everything a chat request with tools needs: (messages and template kwargs for the chat
    template, and the callable tools, None when there are none)."""
    checked = check_tools(tools) if tools is not None else None
    calls = ChatTools.build(tokenizer, checked, tool_choice, parallel_tool_calls)
    rendered, kwargs = render_messages(tokenizer, messages, checked, calls)
    return rendered, kwargs, calls


# -- the grammar and the parse -------------------------------------------------------------------
@dataclass(slots=True)
class ChatTools:
    """The callable tools of one chat request: its grammar, and its replies parsed."""

    tools: list[dict[str, Any]]
    choice: str  # "auto", "required", "none" (an answer only), or the one function to call
    parallel: bool = True
    hermes: bool = False

    @classmethod
    def build(
        cls,
        tokenizer: Tokenizer,
        tools: list[dict[str, Any]] | None,
        tool_choice: Any = "auto",
        parallel_tool_calls: bool = True,
    ) -> ChatTools | None:
        """From checked tools; None when there are none. With tool_choice 'none' the tools stay
        in the prompt (the system message, and so the prefix cache, is the same whatever the
        choice) and the grammar admits only an answer, one without `<tool_call>`."""
        choice = check_tool_choice(tool_choice, [t["function"]["name"] for t in tools or []])
        if not tools:
            return None
        choice = "none" if choice is None else choice
        hermes = renders_tools(tokenizer) and OPEN in (tokenizer.chat_template or "")
        return cls(tools, choice, bool(parallel_tool_calls), hermes)

    def grammar(self, answer: dict[str, Any] | None = None) -> str:
        """Lark: a call list (each call its own `%json`, so `$ref`s stay local), or else an answer
        (free text without `<tool_call>`, or JSON of the `answer` schema)."""
        tools = [
            t
            for t in self.tools
            if self.choice in ("auto", "required") or t["function"]["name"] == self.choice
        ]
        if self.choice == "none":
            lines = ["start: answer"]
            if answer is not None:
                return "\n".join([*lines, f"answer: %json {json.dumps(styled_schema(answer))}"])
            return "\n".join([*lines, "answer: TEXT", ANSWER_TEXT])
        lines = [f"start: {'answer | calls' if self.choice == 'auto' else 'calls'}"]
        if self.hermes:
            one = f'"{OPEN}\\n" call "\\n{CLOSE}"'
            lines.append(f"calls: {one}" + (f' ("\\n" {one})*' if self.parallel else ""))
        else:
            lines.append(
                f'calls: "{OPEN}[" call'
                + (' (", " call)*' if self.parallel else "")
                + f' "]{CLOSE}"'
            )
        lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
        for i, t in enumerate(tools):
            fn = t["function"]
            schema = {
                "type": "object",
                "properties": {
                    "name": {"const": fn["name"]},
                    "arguments": skip_enums(fn["parameters"]),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            lines.append(f"call_{i}: %json {json.dumps(styled_schema(schema))}")
        if answer is not None:
            lines.append(f"answer: %json {json.dumps(styled_schema(answer))}")
        else:
            lines += ["answer: TEXT", ANSWER_TEXT]
        return "\n".join(lines)

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """The params with this grammar; a JSON answer format becomes the answer branch."""
        if params.regex is not None or params.grammar is not None or params.choice is not None:
            if self.choice == "none":  # no call can be made: the caller's constraint alone
                return params
            raise RequestError(
                "tools cannot be combined with a regex, grammar or choice "
                "constraint; send tool_choice 'none' or drop the constraint",
                param="tool_choice",
            )
        answer = (
            params.json_schema
            if params.json_schema is not None
            else ({"type": "object"} if params.json_object else None)
        )
        lark = self.grammar(answer)  # type: ignore[arg-type]
        checked_grammar("lark", lark, "tools")
        return replace(params, json_schema=None, json_object=False, grammar=lark)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """(content, None) for an answer; (None, calls) for a complete call list."""
        if self.choice == "none" or not text.startswith(OPEN):
            return text, None
        calls = scan_calls(text[len(OPEN) :])
        if not calls or not all(c.done for c in calls) or not text.rstrip().endswith(CLOSE):
            return text, None
        return None, [ToolCall(new_call_id(), FunctionCall(c.name, c.arguments)) for c in calls]

    def finish(self, out: CompletionOutput) -> None:
        """Turn a finished output that is a call list into OpenAI's shape, in place."""
        content, calls = self.parse(out.text)
        if calls is not None and out.finish_reason == "stop":
            out.text, out.tool_calls, out.finish_reason = content or "", calls, "tool_calls"


@dataclass(slots=True)
class CallProgress:
    name: str
    arguments: str  # the raw JSON text of the arguments so far
    done: bool  # the arguments are complete


def scan_calls(body: str) -> list[CallProgress]:
    """The calls in the text after `<tool_call>`, the last perhaps still being written. The
    grammar writes `name` then `arguments`, so a call starts at its head and its arguments run
    to their balancing brace."""
    calls: list[CallProgress] = []
    pos = 0
    while (m := _HEAD.search(body, pos)) is not None:
        end = _value_end(body, m.end())
        name = json.loads(f'"{m.group(1)}"')
        calls.append(CallProgress(name, body[m.end() : end or len(body)], end is not None))
        if end is None:
            break
        pos = end
    return calls


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value that starts at `start`; None if it is not complete."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            if depth == 0:  # the end of a bare scalar
                return i
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and c in ", \n":
            return i
    return None
