"""Virtual KV block allocator (one per CP group; every CP rank makes the same decisions).

Block ids are *virtual*: block ``b`` is physical block ``b`` on every CP rank of the group, each holding its
``1/W`` share of the ``block_size·W`` tokens (DESIGN §2). Allocation is all-or-nothing so a request that does not fit
leaves the pool untouched.
"""

from __future__ import annotations

import heapq
from typing import Iterable


class KVCacheFullError(RuntimeError):
    """Not enough free KV blocks for a request; nothing was allocated."""


def blocks_needed(num_tokens: int, block_size: int, cp_world_size: int = 1) -> int:
    """Virtual blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / (block_size·W))``."""
    if num_tokens < 0 or block_size < 1 or cp_world_size < 1:
        raise ValueError(
            f"blocks_needed needs num_tokens >= 0, block_size >= 1, cp_world_size >= 1 "
            f"(got {num_tokens}, {block_size}, {cp_world_size})"
        )
    per_block = block_size * cp_world_size
    return (num_tokens + per_block - 1) // per_block


class BlockAllocator:
    """Free list of ``num_blocks`` block ids ``0 .. num_blocks-1``; hands out the lowest free ids first."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"num_blocks={num_blocks} must be >= 1; give the KV cache more memory or a smaller block_size"
            )
        self.num_blocks = num_blocks
        # A min-heap: the lowest free id always goes first, so allocation is deterministic and identical on every
        # rank that replays the same calls (and easy to read in logs and tests).
        self._free: list[int] = list(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free block ids, or raise ``KVCacheFullError`` and take none."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise KVCacheFullError(
                f"out of KV cache blocks: asked for {n}, {len(self._free)} of {self.num_blocks} free; "
                f"lower max_num_batched_tokens, send fewer or shorter prompts, or give the KV cache more memory "
                f"(a larger decode_context_parallel_size also spreads each sequence over more ranks)"
            )
        taken = [heapq.heappop(self._free) for _ in range(n)]
        for b in taken:
            self._is_free[b] = False
        return taken

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the pool. Unknown ids, blocks already free or repeated ids raise and free nothing."""
        ids = [int(b) for b in block_ids]
        seen: set[int] = set()
        for b in ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} is not in this pool [0, {self.num_blocks})")
            if self._is_free[b] or b in seen:
                raise ValueError(f"double free of KV block {b}: it is already free (freed twice by the caller?)")
            seen.add(b)
        for b in ids:
            self._is_free[b] = True
            heapq.heappush(self._free, b)
