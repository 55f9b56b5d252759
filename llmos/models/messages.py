"""One normalizer for chat messages, on every path to a chat template (`LLM.chat`, the server,
the local backend, the text tool prompt), so a message means the same wherever it enters.

- `developer` (OpenAI's newer name for the system role) becomes `system`: the templates of
  open-weight models know only `system`.
- Content given as parts (`[{"type": "text", "text": ...}]`) becomes one text; a part that is
  not text is refused, since these models read text only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmos.errors import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
_TEMPLATE_ROLE = {"developer": "system"}


def normalize(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` as chat templates expect them. Errors name the message's field."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role: unknown role {role!r}; expected one of {list(ROLES)}",
                param=f"messages[{i}].role",
            )
        out.append({**m, "role": _TEMPLATE_ROLE.get(role, role), "content": _text(m, i)})
    return out


def _text(message: dict[str, Any], index: int) -> str | None:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(
            f"messages[{index}].content must be a string or a list of text parts",
            param=f"messages[{index}].content",
        )
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text", ""), str):
            raise RequestError(
                f"messages[{index}].content: {kind or type(part).__name__!r} parts are not "
                "supported; this model reads text only",
                param=f"messages[{index}].content",
            )
        texts.append(part.get("text") or "")
    return "\n".join(texts)
