"""`llmos serve --trim-history`: the kernel's trim policy for plain chat clients that send more
history than fits. Off by default (a request that does not fit is refused, 400
context_length_exceeded, as vLLM does); when on, the leading system messages and the newest
message are kept, old tool outputs are elided and the oldest messages dropped whole (an
assistant call with its results), and the response's `usage.context_trim` says what was done.
A history that cannot fit even so is still a 400, naming why."""

from __future__ import annotations

from typing import Any

from llmos.engine.tool_calls import prepare_chat
from llmos.kernel.memory import ContextOverflow, Counter, compact
from llmos.kernel.memory_config import MemoryConfig
from llmos.models.messages import normalize
from llmos.server.errors import APIError

DEFAULT_ROOM_FOR_REPLY = 512  # tokens left for the reply when the request sets no max_tokens


def trim(
    state: Any, req: Any, messages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The messages to render, and what trimming did (None: nothing had to be)."""
    tok = state.engine.tokenizer
    msgs = normalize(messages)

    def count(ms: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
        rendered, kwargs, _ = prepare_chat(
            tok, ms, tools or None, req.tool_choice if tools else None, req.parallel_tool_calls
        )
        add = req.add_generation_prompt
        return len(tok.encode_chat(rendered, add_generation_prompt=add, **kwargs))

    reply = req.requested_max_tokens or DEFAULT_ROOM_FOR_REPLY
    room = state.max_model_len - reply
    pinned = 1
    while pinned < len(msgs) - 1 and msgs[pinned]["role"] == "system":
        pinned += 1
    try:
        out, c = compact(
            msgs, Counter(count, req.tools or []), room, MemoryConfig(low_water=1.0), pinned=pinned
        )
    except ContextOverflow as exc:
        raise APIError(
            400,
            f"This model's maximum context length is {state.max_model_len} tokens and "
            f"{reply} are asked for the reply; trimming the history could not make the rest "
            f"fit: {exc}",
            param="messages",
            code="context_length_exceeded",
        ) from None
    if c is None:
        return msgs, None
    return out, {
        "policy": "trim",
        "messages_dropped": c.cut,
        "messages_elided": len(c.elided),
        "prompt_tokens_before": c.tokens_before,
        "prompt_tokens_after": c.tokens_after,
    }
