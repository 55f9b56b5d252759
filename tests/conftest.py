"""Shared fixtures. The real embedded model is loaded once per test session."""

from __future__ import annotations

import pytest

from llmos import LLM


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The embedded model with a small KV cache (so tests exercise block reuse)."""
    return LLM(kv_cache_memory="256MiB")


@pytest.fixture(autouse=True)
def _no_leaked_blocks(request: pytest.FixtureRequest):
    """Every test that used the shared engine must leave all KV blocks free."""
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished_requests(), "requests left in the engine"
        assert engine.blocks.num_used == 0, f"{engine.blocks.num_used} KV blocks leaked"
