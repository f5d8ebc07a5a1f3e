"""The KV-cache block allocator: which physical blocks are free, and which sequence owns the rest.

Pure Python. The KV tensors themselves live in :mod:`acb.kv_cache`; this module only hands out block indices.
"""

from __future__ import annotations

__all__ = ["BlockAllocator", "OutOfBlocksError"]


class OutOfBlocksError(RuntimeError):
    """Internal: asked for more blocks than are free (the scheduler checks first, so this is a bug)."""


class BlockAllocator:
    """A free list of ``num_blocks`` fixed-size blocks.

    Blocks are handed out lowest index first from a stack, so a freshly started engine fills the cache from the
    front (friendlier to debugging and to memory locality).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))
        self._owned = bytearray(num_blocks)  # 1 where a block is handed out: catches double frees

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._owned[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            if not self._owned[b]:
                raise RuntimeError(f"block {b} freed twice")
            self._owned[b] = 0
            self._free.append(b)
