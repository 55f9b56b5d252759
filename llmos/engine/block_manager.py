"""Paged KV blocks: a free list, reference counts, and the prefix cache. No torch.

A full block is named by a chained hash of its tokens and of the blocks before it, so two
sequences that share a prefix share its blocks. A freed block keeps its contents and its name,
and stays findable until it is evicted (least recently freed first) for new work.

A pin keeps a finished conversation's named blocks in use under a key (an agent process waiting
on a tool), so its next turn prefills only the new tokens. Pins are a cache, not a promise: the
scheduler releases the oldest one before it would stall or preempt real work.

Blocks are handed out lowest id first and reused last-freed first, so on the CPU (where the KV
tensors are allocated lazily by the OS) resident memory follows the tokens actually in use.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from llmos.engine.sequence import Sequence


def chain_hash(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # unnamed; a stack, lowest id on top
        self._evictable: OrderedDict[int, None] = OrderedDict()  # named and free, LRU first
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}
        # Blocks handed out since the last `take_new_blocks()`: the runner zeroes them, since a
        # fresh block's unwritten slots would otherwise hold whatever the allocator left there
        # (NaN times a zero attention weight is still NaN).
        self._new: list[int] = []
        self._pins: OrderedDict[str, list[int]] = OrderedDict()  # key -> blocks, oldest first
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks that hold a named prefix (in use or evictable)."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of `seq`'s first `num_blocks` full blocks (memoized on seq)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            prev = hashes[-1] if hashes else b""
            hashes.append(chain_hash(prev, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq`, leaving its last token to compute."""
        if not self.prefix_caching:
            return []
        hits: list[int] = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._block_of.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a sequence reusing `hits` can be given blocks for `num_tokens` tokens."""
        reusable_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        need = self.blocks_for(num_tokens) - len(hits)
        return need <= self.num_free - reusable_free

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give `seq` the cached blocks `hits`; their tokens count as computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.queried_tokens += seq.num_tokens
        self.hit_tokens += seq.num_computed_tokens

    def commit(self, seq: Sequence) -> None:
        """Name the blocks that `seq` has filled, so later requests can find them."""
        if not self.prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if seq.num_named_blocks >= full:
            return
        for i, h in enumerate(
            self._hashes(seq, full)[seq.num_named_blocks :], seq.num_named_blocks
        ):
            block = seq.block_table[i]
            if h not in self._block_of and self._hash_of[block] is None:
                self._block_of[h] = block
                self._hash_of[block] = h
        seq.num_named_blocks = full

    # -- allocation -----------------------------------------------------------------------
    def _evict_oldest(self) -> int:
        """Take the least recently freed named block out of the cache."""
        block, _ = self._evictable.popitem(last=False)
        h = self._hash_of[block]
        assert h is not None
        del self._block_of[h]
        self._hash_of[block] = None
        return block

    def _take_free(self) -> int:
        return self._free.pop() if self._free else self._evict_oldest()

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens`; False (and no change) if out of blocks."""
        need = max(0, self.blocks_for(num_tokens) - len(seq.block_table))
        if need > self.num_free:
            return False
        for _ in range(need):
            block = self._take_free()
            assert self.ref_counts[block] == 0
            self.ref_counts[block] = 1
            seq.block_table.append(block)
            self._new.append(block)
        return True

    def take_new_blocks(self) -> list[int]:
        new, self._new = self._new, []
        return new

    def _unref(self, blocks: list[int]) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if self._hash_of[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens (rejected drafts' slots).
        Those blocks hold no named prefix: a name covers computed, accepted tokens only."""
        keep = self.blocks_for(num_tokens)
        if len(seq.block_table) > keep:
            assert seq.num_named_blocks <= keep
            self._unref(seq.block_table[keep:])
            del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        self._unref(seq.block_table)
        seq.block_table = []
        seq.num_named_blocks = 0

    # -- pins -----------------------------------------------------------------------------
    def pin(self, key: str, seq: Sequence) -> None:
        """Keep `seq`'s named blocks in use under `key`, replacing the key's previous pin."""
        blocks = seq.block_table[: seq.num_named_blocks]
        for block in blocks:
            self.ref_counts[block] += 1  # in use by seq, so never on a free list here
        old = self._pins.pop(key, None)
        self._pins[key] = blocks
        if old is not None:
            self._unref(old)

    def release(self, key: str) -> bool:
        """Drop the pin under `key`; its blocks stay findable in the prefix cache until evicted."""
        blocks = self._pins.pop(key, None)
        if blocks is None:
            return False
        self._unref(blocks)
        return True

    def release_oldest_pin(self) -> bool:
        """Under memory pressure: drop the longest-held pin. False when there is none."""
        if not self._pins:
            return False
        return self.release(next(iter(self._pins)))

    @property
    def num_pins(self) -> int:
        return len(self._pins)

    def pin_sizes(self) -> dict[str, int]:
        """How many blocks each retain key holds, oldest pin first."""
        return {key: len(blocks) for key, blocks in self._pins.items()}

    def pinned_blocks(self) -> set[int]:
        """Blocks held by at least one pin."""
        return {b for blocks in self._pins.values() for b in blocks}

    @property
    def num_pinned(self) -> int:
        return len(self.pinned_blocks())

    def reset_prefix_cache(self) -> None:
        """Forget every evictable named block (those in use keep their names)."""
        while self._evictable:
            self._free.append(self._evict_oldest())
