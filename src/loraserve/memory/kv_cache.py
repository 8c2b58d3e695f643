"""KV block tables: which pool pages hold which tokens of each sequence.

Token ``t`` of a request lives in page ``request.block_table[t // block_size]`` at slot
``t % block_size`` (for every layer: a page holds all layers, see pool.py).
"""

from __future__ import annotations

from loraserve.memory.pool import PageKind, PagePool
from loraserve.request import Request


class KVCacheManager:
    """Grows and frees the block tables of requests, taking pages from the shared pool."""

    def __init__(self, pool: PagePool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, request: Request, num_tokens: int) -> int:
        """Pages ``request`` must add so that ``num_tokens`` tokens have slots."""
        return max(0, self.blocks_needed(num_tokens) - len(request.block_table))

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Extend ``request``'s block table to hold ``num_tokens`` tokens. All or nothing."""
        n = self.extra_blocks(request, num_tokens)
        if n == 0:
            return True
        pages = self.pool.allocate(n, PageKind.KV)
        if pages is None:
            return False
        request.block_table.extend(pages)
        return True

    def free(self, request: Request) -> None:
        self.pool.free(request.block_table)
        request.block_table = []


def kv_slot(request: Request, position: int, block_size: int) -> int:
    """Flat slot (page * block_size + offset) of token ``position`` of ``request``."""
    page = request.block_table[position // block_size]
    return page * block_size + position % block_size
