"""`EngineStats`: one frozen snapshot of the engine's counters.

The engine's state (scheduler queues, block manager, pins) belongs to the thread that steps it.
Every other reader (HTTP routes, `/metrics`, admission, a console) reads only the last snapshot
the engine thread published, which never changes after it is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_requests_running: int = 0  # sequences in the running batch
    num_requests_waiting: int = 0  # sequences waiting for a place in the batch or for blocks
    kv_blocks_used: int = 0  # blocks referenced by a sequence or a pin
    kv_blocks_total: int = 0
    kv_blocks_pinned: int = 0  # blocks held by at least one pin
    kv_blocks_orphaned: int = 0  # in use, yet held by no live request and no pin: a leak
    num_pins: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found (not recomputed)
    num_steps: int = 0
    # speculative decoding (vLLM's vllm:spec_decode_* counters)
    spec_num_drafts: int = 0  # verification steps that carried drafts
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
