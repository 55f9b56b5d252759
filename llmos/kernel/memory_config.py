"""A program's memory policy (`memory:` in its spec): how its prompt is made to fit the
context window. Kept apart from `memory.py` so `program.py` can check it without importing
processes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

POLICIES = ("trim", "summarize", "page")


@dataclass(slots=True)
class MemoryConfig:
    """`trim`: elide old tool outputs, then drop the oldest exchanges, leaving a note.
    `summarize`: as trim, but the model writes what was dropped into a running summary.
    `page`: MemGPT's scheme: core memory blocks pinned at the front, every message that leaves
    the window kept in searchable recall memory, an archive, and the five memory syscalls."""

    policy: str = "trim"
    keep_recent: int = 4  # messages at the end that are dropped only as a last resort
    # A compaction cuts down to this share of the room, so the turns after it only append
    # (and hit the prefix cache) until the window fills again.
    low_water: float = 0.7
    summary_tokens: int = 200  # summarize: the most a summary may be
    # page: the starting core memory blocks, name -> text (the model edits them with syscalls)
    core: dict[str, str] = field(default_factory=dict)
    core_chars: int = 2000  # page: the most one core block may hold
    page_in: int = 4  # page: recall hits paged in at the end of a compacted prompt (0: none)
    page_tokens: float = 0.15  # page: the share of the room that paged-in text may take
    search_results: int = 5  # recall_search / archive_search: the most hits one call returns

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"memory.policy must be one of {list(POLICIES)}, got {self.policy!r}")
        for name in ("keep_recent", "page_in"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"memory.{name} must be a whole number >= 0")
        for name in ("summary_tokens", "core_chars", "search_results"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"memory.{name} must be a whole number >= 1")
        if not 0.1 <= self.low_water <= 1.0:
            raise ValueError(f"memory.low_water must be in [0.1, 1], got {self.low_water}")
        if not 0.0 <= self.page_tokens <= 0.5:
            raise ValueError(f"memory.page_tokens must be in [0, 0.5], got {self.page_tokens}")
        if not isinstance(self.core, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.core.items()
        ):
            raise ValueError("memory.core must map block names to text, like {persona: ...}")
        big = [k for k, v in self.core.items() if len(v) > self.core_chars]
        if big:
            raise ValueError(f"memory.core: block(s) {big} exceed core_chars={self.core_chars}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str | None) -> MemoryConfig:
        """From a program's `memory:` field: a mapping, or just the policy's name."""
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(policy=data)
        if not isinstance(data, dict):
            raise ValueError("memory must be a policy name or a mapping like {policy: page}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"memory: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
