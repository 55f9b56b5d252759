"""The memory system calls of a `page` program: core memory (`memory_set`, `memory_append`),
recall memory (`recall_search`) and archival memory (`archive_insert`, `archive_search`).

Core memory is derived from the transcript (the program's starting blocks, then every
successful edit in order), so it needs no table and survives a resume. Every result is
bounded (a block's size, a number of hits of bounded length), so no memory call can overflow
the window it is meant to save."""

from __future__ import annotations

import json
from typing import Any

from llmos.backends.base import ToolCall
from llmos.kernel import memory_store
from llmos.kernel.process import ModelTurn, Process, ToolResultStep
from llmos.kernel.store import Store
from llmos.kernel.toolspec import ToolResult

HIT_CHARS = 600  # one search hit, at most, in a tool result


def _fn(name: str, doc: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": doc,
            "parameters": {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


_S = {"type": "string"}
SCHEMAS = [
    _fn(
        "memory_set",
        "Replace a core memory block (always shown at the top of your context).",
        {"block": _S, "text": _S},
        ["block", "text"],
    ),
    _fn(
        "memory_append",
        "Add a line to a core memory block.",
        {"block": _S, "text": _S},
        ["block", "text"],
    ),
    _fn(
        "recall_search",
        "Search the earlier conversation that no longer fits in your context.",
        {"query": _S},
        ["query"],
    ),
    _fn(
        "archive_insert",
        "Store a note or document in long-term archival memory.",
        {"text": _S},
        ["text"],
    ),
    _fn("archive_search", "Search long-term archival memory.", {"query": _S}, ["query"]),
]
NAMES = frozenset(s["function"]["name"] for s in SCHEMAS)


def schemas(proc: Process) -> list[dict[str, Any]]:
    return list(SCHEMAS) if proc.program.memory_config.policy == "page" else []


def handles(proc: Process, name: str) -> bool:
    return name in NAMES and proc.program.memory_config.policy == "page"


def _args(call_args: str) -> dict[str, Any]:
    try:
        args = json.loads(call_args or "{}")
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


def apply_edit(blocks: dict[str, str], name: str, args: dict[str, Any], limit: int) -> str:
    """Edit `blocks` in place; returns what the call reports, or raises ValueError."""
    block, text = args.get("block"), args.get("text")
    if not isinstance(block, str) or not block.strip():
        raise ValueError(f"{name}: argument 'block' must be a block name, like 'user'")
    if not isinstance(text, str):
        raise ValueError(f"{name}: argument 'text' must be a string")
    block = block.strip()
    new = text if name == "memory_set" else "\n".join(x for x in (blocks.get(block), text) if x)
    if len(new) > limit:
        raise ValueError(
            f"{name}: block {block!r} would hold {len(new)} characters, over its limit of "
            f"{limit}; rewrite it shorter with memory_set"
        )
    blocks[block] = new
    return f"core memory block {block!r} now holds {len(new)} characters"


def core_blocks(proc: Process) -> dict[str, str]:
    cfg = proc.program.memory_config
    blocks = dict(cfg.core)
    calls = {c.id: c for s in proc.steps if isinstance(s, ModelTurn) for c in s.tool_calls}
    for s in proc.steps:
        if isinstance(s, ToolResultStep) and s.ok and s.name in ("memory_set", "memory_append"):
            call = calls.get(s.call_id)
            if call is not None:
                try:
                    apply_edit(blocks, s.name, _args(call.arguments), cfg.core_chars)
                except ValueError:
                    pass  # refused when it ran: it changed nothing
    return blocks


def render_core(blocks: dict[str, str]) -> str:
    if not blocks:
        return "<core_memory>\n(empty: save what you must remember with memory_set)\n</core_memory>"
    inner = "\n".join(f"<{k}>\n{v}\n</{k}>" for k, v in blocks.items())
    return f"<core_memory>\n{inner}\n</core_memory>"


def _hits(hits: list[memory_store.Hit], what: str) -> str:
    if not hits:
        return f"no {what} matches"
    return "\n".join(f"[{h.role} {h.ref}] {h.content[:HIT_CHARS]}" for h in hits)


def run(store: Store, proc: Process, call: ToolCall) -> ToolResult:
    """One memory call; a refusal is a failed result naming the argument, never a raise."""
    cfg = proc.program.memory_config
    args = _args(call.arguments)
    try:
        if call.name in ("memory_set", "memory_append"):
            return ToolResult(True, apply_edit(core_blocks(proc), call.name, args, cfg.core_chars))
        if call.name == "archive_insert":
            text = args.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("archive_insert: argument 'text' must be a non-empty string")
            n = memory_store.archive_insert(store, proc.pid, text, "model")
            return ToolResult(True, f"archived as {n} passage(s)")
        query = args.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"{call.name}: argument 'query' must be a non-empty string")
        k = cfg.search_results
        if call.name == "recall_search":
            hits = memory_store.recall_search(store, proc.pid, query, k)
            return ToolResult(True, _hits(hits, "recall"))
        if call.name == "archive_search":
            hits = memory_store.archive_search(store, proc.pid, query, k)
            return ToolResult(True, _hits(hits, "archive"))
        raise ValueError(f"unknown memory call {call.name!r}")
    except ValueError as exc:
        return ToolResult(False, error=str(exc))
