"""PagePool: the one owner of the device memory that holds KV cache and adapter weights.

One preallocated buffer is cut into ``num_pages`` equal pages of ``page_elems`` elements
(the model dtype). A page is the unit of allocation for everyone:

    buffer  [num_pages, page_elems]
    +--------+--------+--------+--------+--------+--------+-----
    | KV  p0 | LoRA   | KV  p2 | free   | LoRA   | KV  p5 | ...
    +--------+--------+--------+--------+--------+--------+-----

A KV page holds ``block_size`` consecutive tokens of one sequence, K and V, for every
layer; viewed through ``kv_view()`` it is

    page [num_layers, 2 (K|V), block_size, num_kv_heads, head_dim]

so one block table per sequence serves every layer. An adapter page is the same bytes
viewed as a flat run of elements into which whole LoRA rows are packed (A rows of the
layer's input width, B^T rows of its output width); a row never straddles two pages, so
a kernel addresses row j of an adapter by one element offset into the buffer (see
docs/architecture.md).

Owners ask for pages with ``allocate`` (all or nothing) and give them back with ``free``.
When too few pages are free, the pool asks its reclaimers (e.g. the adapter cache, which
holds idle adapters it can evict) to give pages back before it says no. ``allocate``
hands out the most recently freed pages first; ``oldest=True`` (adapter copies) the ones
freed longest ago, whose last device use is most likely over.

On CUDA a page may be freed while steps the device has not finished still touch it (a
queued step writes a finished request's last KV row). Work on another stream that writes
freed pages (an adapter's copy) first waits for ``fence_for(pages)``: the first of the
fences (CUDA events the engine records with ``fence`` after launching each step) that
follows the work enqueued before the pages were freed.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


class PageKind(enum.IntEnum):
    FREE = 0
    KV = 1
    ADAPTER = 2
    RESERVED = 3  # scratch pages owned by the engine itself (e.g. CUDA-graph padding)


# A reclaimer is asked to free at least n pages; it returns how many it freed.
Reclaimer = Callable[[int], int]


class PagePool:
    """Fixed-size pages out of one device buffer, with an owner tag per page."""

    def __init__(
        self,
        num_pages: int,
        page_elems: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_pages <= 0 or page_elems <= 0:
            raise ValueError(f"pool needs pages: num_pages={num_pages}, page_elems={page_elems}")
        self.num_pages = num_pages
        self.page_elems = page_elems
        self.buffer = torch.empty(num_pages, page_elems, dtype=dtype, device=device)
        # Pages are handed out from the end of the list: low page ids first.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._kind = [PageKind.FREE] * num_pages
        self._used = {PageKind.KV: 0, PageKind.ADAPTER: 0, PageKind.RESERVED: 0}
        self._reclaimers: list[Reclaimer] = []
        # Fences: CUDA events recorded on the compute stream. Fence j (from 1) follows all
        # work enqueued before it; _fences holds those from _fences_done + 1 on, not yet
        # seen complete. _freed_after[p]: how many fences had been recorded when p was last
        # freed (so fence _freed_after[p] + 1 follows the work that may still touch it).
        self._fences: deque[torch.cuda.Event] = deque()
        self._fences_recorded = 0
        self._fences_done = 0
        self._freed_after = [0] * num_pages

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self.buffer.element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def num_used(self, kind: PageKind) -> int:
        return self._used[kind]

    def add_reclaimer(self, reclaimer: Reclaimer) -> None:
        self._reclaimers.append(reclaimer)

    def can_allocate(self, n: int) -> bool:
        """True if ``n`` pages are free now (without reclaiming)."""
        return n <= len(self._free)

    def allocate(self, n: int, kind: PageKind, oldest: bool = False) -> list[int] | None:
        """``n`` pages for ``kind``, or None (nothing taken) if even reclaiming cannot
        free enough. The most recently freed first; ``oldest``: those freed longest ago (in
        ascending ids, so neighbours make one copy)."""
        if kind is PageKind.FREE:
            raise ValueError("allocate needs an owner kind, not FREE")
        if n > len(self._free):
            self._reclaim(n - len(self._free))
        if n > len(self._free):
            return None
        if oldest:
            pages = sorted(self._free[:n])
            del self._free[:n]
        else:
            pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._kind[p] = kind
        self._used[kind] += n
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            kind = self._kind[p]
            if kind is PageKind.FREE:
                raise RuntimeError(f"page {p} freed twice")
            self._kind[p] = PageKind.FREE
            self._used[kind] -= 1
            self._free.append(p)
            self._freed_after[p] = self._fences_recorded

    def fence(self) -> None:
        """Record a fence on the current CUDA stream: pages freed before now are free of
        the work enqueued on it so far once the device passes this point (the engine calls
        it after launching each step). Does nothing off CUDA."""
        if self.buffer.device.type == "cuda":
            self._add_fence(self._record())

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.buffer.device))
        return event

    def _add_fence(self, event: torch.cuda.Event) -> None:
        self._retire()
        self._fences.append(event)
        self._fences_recorded += 1

    def _retire(self) -> None:
        while self._fences and self._fences[0].query():
            self._fences.popleft()
            self._fences_done += 1

    def fence_for(self, pages: list[int]) -> torch.cuda.Event | None:
        """The event after which no device work touches ``pages`` (what the current stream
        had enqueued when they were last freed): the first fence recorded after the latest
        of those frees, one recorded now if none was since; None if it has passed. Work on
        another stream that writes the pages waits for it (CUDA only)."""
        after = max((self._freed_after[p] for p in pages), default=0)
        if after < self._fences_done:
            return None  # (fence after + 1 has completed)
        if after >= self._fences_recorded:
            self._add_fence(self._record())
        self._retire()
        if after < self._fences_done:
            return None
        return self._fences[after - self._fences_done]

    def _reclaim(self, n: int) -> None:
        for reclaim in self._reclaimers:
            if n <= 0:
                return
            n -= reclaim(n)

    def kv_view(
        self, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> torch.Tensor:
        """The buffer as [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim]."""
        need = num_layers * 2 * block_size * num_kv_heads * head_dim
        if need != self.page_elems:
            raise ValueError(
                f"KV page geometry needs {need} elements, pages have {self.page_elems}"
            )
        return self.buffer.view(self.num_pages, num_layers, 2, block_size, num_kv_heads, head_dim)

    def check_integrity(self) -> None:
        """Every page is either free (exactly once on the free list) or owned; the counts
        agree. Raises AssertionError otherwise."""
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "a page is on the free list twice"
        for p, kind in enumerate(self._kind):
            assert (kind is PageKind.FREE) == (p in free_set), f"page {p}: kind {kind.name}"
        for kind, used in self._used.items():
            actual = sum(1 for k in self._kind if k is kind)
            assert used == actual, f"{kind.name} count {used} != {actual}"


def kv_page_elems(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Elements in one page: ``block_size`` tokens of K and V for every layer."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim


def pages_for_budget(budget_bytes: int, page_elems: int, dtype: torch.dtype) -> int:
    page_bytes = page_elems * torch.tensor([], dtype=dtype).element_size()
    return budget_bytes // page_bytes
