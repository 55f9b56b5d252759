"""Paged KV blocks: a free list and reference counts. No torch: block ids only.

Blocks are handed out lowest id first and reused last-freed first, so on the CPU (where the KV
tensors are allocated lazily by the OS) resident memory follows the tokens actually in use.
"""

from __future__ import annotations

from llmos.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id
        # Blocks handed out since the last `take_new_blocks()`: the runner zeroes them, since a
        # fresh block's unwritten slots would otherwise hold whatever the allocator left there
        # (NaN times a zero attention weight is still NaN).
        self._new: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens`; False (and no change) if out of blocks."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.pop()
            assert self.ref_counts[block] == 0
            self.ref_counts[block] = 1
            seq.block_table.append(block)
            self._new.append(block)
        return True

    def take_new_blocks(self) -> list[int]:
        new, self._new = self._new, []
        return new

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table = []
