"""Where an LLM call goes: the local engine, any OpenAI-compatible URL, or a script.

`resolve("local:smollm2-135m")`, `resolve("openai_http:MODEL@http://host:8000/v1")`,
`resolve("scripted:turns.json")`, `resolve("pool:[local, openai_http:m@URL]")` (see
pool_spec.py). Implementations import lazily, so naming a remote backend never loads torch."""

from __future__ import annotations

from llmos.backends.base import Backend, ChatRequest, ChatResult, Message, ToolCall, Usage

__all__ = ["Backend", "ChatRequest", "ChatResult", "Message", "ToolCall", "Usage", "resolve"]


class UnknownBackendError(ValueError):
    """A backend name that names no backend; the message lists the forms that work."""


def resolve(name: str) -> Backend:
    kind, _, rest = name.partition(":")
    if kind == "local":
        from llmos.backends.local import LocalBackend

        return LocalBackend(**({"model": rest} if rest else {}))
    if kind == "openai_http" and "@" in rest:
        from llmos.backends.openai_http import OpenAIHTTPBackend

        model, _, url = rest.partition("@")
        return OpenAIHTTPBackend(url, model)
    if kind == "pool" and rest:
        from llmos.backends.pool_spec import parse

        return parse(rest)
    if kind == "scripted" and rest:
        from llmos.backends.scripted import ScriptedBackend

        return ScriptedBackend.from_file(rest)
    raise UnknownBackendError(
        f"model: unknown backend {name!r}; use 'local[:MODEL]', "
        "'openai_http:MODEL@URL', 'pool:[NAME, NAME, ...]' or 'scripted:FILE.json'"
    )
