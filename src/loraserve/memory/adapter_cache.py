"""AdapterCache: which adapters are resident in the page pool, where their rows are, and
which are in use.

An adapter's weights are packed as rows into pages taken from the same PagePool as the KV
cache (Unified Paging). For every (layer, target) a rank-r adapter has r rows of A (the
target's input width) and r rows of B^T (its output width); rows are laid out one after
another through the adapter's pages, and a row that would cross a page end starts at the
next page:

    virtual space of adapter "a" (its pages, in allocation order)
    | page 0                         | page 1                         |
    | A(0,q) r0 | A(0,q) r1 | B(0,q) r0 | ... |pad| A(0,down) r0 | ...
    row_offsets[slot, layer, target, 0|1, j] = pool element offset of row j of A | B^T

Residency contract:
- ``acquire`` pins a resident adapter for a running request (a count per adapter);
  ``release`` unpins it. Pinned adapters are never evicted.
- Unpinned adapters stay resident (an LRU cache in the pool) until the pool needs their
  pages: the cache is a reclaimer of the pool, so KV growth and other adapters' loads evict
  idle adapters, least recently used first, before anything is preempted.
- ``pack`` lays an adapter's rows out in a (pinned) host staging buffer, exactly as they
  will sit in its pages, with its tables in page-relative form. It touches no pool state, so
  the adapter I/O thread runs it off the step loop. ``load`` then only allocates the pages
  (all or nothing), turns the relative tables into pool offsets and copies the buffer page by
  page; on CUDA the copies run on a side stream and the adapter counts as ``ready`` once
  they have completed, so loading overlaps the step that is computing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from loraserve.adapters.peft import LoRAWeights
from loraserve.config import LORA_TARGETS, ModelConfig, target_mask
from loraserve.kernels.lora import FUSED_MAX_RANK, LoRABatch
from loraserve.memory.pool import PageKind, PagePool

logger = logging.getLogger(__name__)


@dataclass
class ResidentAdapter:
    name: str
    slot: int
    pages: list[int]
    nbytes: int
    refcount: int = 0
    ready_event: torch.cuda.Event | None = None
    host_tables: tuple[torch.Tensor, ...] | None = None  # pinned sources of the table copy

    def ready(self) -> bool:
        """Its copy has completed (the event is dropped then: nothing waits on it again)."""
        if self.ready_event is None or self.ready_event.query():
            self.ready_event = None
            self.host_tables = None
            return True
        return False


@dataclass
class PackedAdapter:
    """An adapter laid out for its pages, on the host (``AdapterCache.pack``)."""

    weights: LoRAWeights
    staging: torch.Tensor  # num_pages * page_elems, rows where they will sit in the pages
    num_pages: int
    # The row-offset table [layers, targets, 2, max_rank] as (page index, offset in page)
    # in the adapter's own pages; rows it lacks point at index num_pages, offset 0 (a page
    # id of 0 is appended at load: table entry 0). ``load`` only gathers the page ids.
    rel_page: np.ndarray  # int64
    rel_mod: np.ndarray  # int64
    ranks: torch.Tensor  # [layers, targets] int32 (pinned on CUDA)
    scalings: torch.Tensor  # [layers, targets] fp32 (pinned on CUDA)
    table: torch.Tensor  # [layers, targets, 2, max_rank] int64 (pinned on CUDA), set at load

    @property
    def name(self) -> str:
        return self.weights.name


@dataclass
class CacheStats:
    gpu_hits: int = 0  # requests whose adapter was resident when they first asked for it
    gpu_misses: int = 0  # requests that had to wait for their adapter to be loaded
    gpu_loads: int = 0
    gpu_evictions: int = 0
    bytes_loaded: int = 0
    load_failures: int = 0
    extra: dict = field(default_factory=dict)


class AdapterCache:
    """GPU (pool) tier of adapters. Tables are indexed by slot; at most ``max_loras``
    adapters are resident at once, with ranks up to ``max_rank``."""

    def __init__(
        self,
        pool: PagePool,
        model: ModelConfig,
        max_loras: int,
        max_rank: int,
    ) -> None:
        self.pool = pool
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.device = pool.buffer.device
        widest = max(max(model.lora_shape(t)) for t in LORA_TARGETS)
        if widest > pool.page_elems:
            raise ValueError(
                f"a LoRA row of {widest} elements does not fit a page of {pool.page_elems}: "
                "raise block_size"
            )
        widths = {w for t in LORA_TARGETS for w in model.lora_shape(t)} | {pool.page_elems}
        # Rows start at multiples of every width and of the page: kernels may use wide loads.
        self.row_align = 8 if all(w % 8 == 0 for w in widths) else 1
        self.rank_pack = False  # LoRABatch.rank_pack of the batches made here (the engine's)
        self.fused_decode = False  # ... and LoRABatch.fused_decode
        self.fused_max_rank = FUSED_MAX_RANK  # ... and LoRABatch.fused_max_rank
        # False: every batch takes tiles for the tables' width (the padded bmm ablation)
        self.narrow_tiles = True
        shape = (max_loras, model.num_hidden_layers, len(LORA_TARGETS))
        self.row_offsets = torch.zeros((*shape, 2, max_rank), dtype=torch.int64, device=self.device)
        self.ranks = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.scalings = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU order
        self._free_slots = list(range(max_loras - 1, -1, -1))
        # Per slot, the targets its adapter adapts (bits of LORA_TARGETS; 0: free): a step
        # launches LoRA only for the layers' projections that some adapter in it adapts.
        self.slot_targets = [0] * max_loras
        self.slot_ranks = [0] * max_loras  # each slot's largest rank (0: free), on the host
        on_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if on_cuda else None
        self._staging = _StagingPool(pool.buffer.dtype, pinned=on_cuda)
        self.stats = CacheStats()
        self._protected: Collection[str] = ()  # not evicted by the load under way
        pool.add_reclaimer(self._reclaim)

    # ---- queries ------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def get(self, name: str) -> ResidentAdapter | None:
        return self._resident.get(name)

    def is_ready(self, name: str) -> bool:
        adapter = self._resident.get(name)
        return adapter is not None and adapter.ready()

    def resident(self) -> Iterator[ResidentAdapter]:
        return iter(self._resident.values())

    @property
    def staging(self) -> dict[str, float]:
        """Host staging buffers made so far: count, bytes, seconds spent making them."""
        st = self._staging
        return {
            "allocations": st.allocations,
            "bytes": st.allocated_bytes,
            "seconds": st.allocation_seconds,
        }

    def reserve_staging(self, count: int) -> int:
        """Make staging buffers now, up to ``count`` free ones, each as large as the largest
        adapter packed so far: loads in flight together then find one each instead of
        pinning fresh host memory (~0.8 ms per MB on the H200's host) while steps run.
        Returns how many were made."""
        return self._staging.reserve(count)

    @property
    def num_pinned(self) -> int:
        return sum(1 for a in self._resident.values() if a.refcount > 0)

    def pages_needed(self, weights: LoRAWeights | PackedAdapter) -> int:
        if isinstance(weights, PackedAdapter):
            return weights.num_pages
        _, size = _layout(_matrices(weights), self.pool.page_elems)
        return -(-size // self.pool.page_elems)

    # ---- pinning --------------------------------------------------------------------

    def acquire(self, name: str) -> int:
        """Pin a resident adapter; returns its slot."""
        adapter = self._resident[name]
        adapter.refcount += 1
        self._resident.move_to_end(name)
        return adapter.slot

    def release(self, name: str) -> None:
        adapter = self._resident[name]
        if adapter.refcount <= 0:
            raise RuntimeError(f"adapter {name!r} released more often than acquired")
        adapter.refcount -= 1

    def lora_batch(
        self,
        seg_start: torch.Tensor,
        seg_slot: torch.Tensor,
        max_seg_len: int,
        max_rank: int | None = None,
    ) -> LoRABatch:
        """A step's LoRA metadata over this cache's tables: segment s is token rows
        seg_start[s] .. seg_start[s + 1] with the adapter in slot seg_slot[s] (-1: none).
        ``max_rank``: the kernels' tiles for ranks up to it (default: the tables' width;
        narrower only where every adapter in the segments fits it, see ``width_for``)."""
        return LoRABatch(
            seg_start=seg_start,
            seg_slot=seg_slot,
            row_offsets=self.row_offsets,
            ranks=self.ranks,
            scalings=self.scalings,
            max_rank=self.max_rank if max_rank is None else max_rank,
            max_seg_len=max_seg_len,
            num_segments=seg_slot.shape[0],
            row_align=self.row_align,
            rank_pack=self.rank_pack,
            fused_decode=self.fused_decode,
            fused_max_rank=self.fused_max_rank,
        )

    @property
    def small_rank(self) -> int:
        """A narrower tile width for steps whose adapters all have ranks up to it, where the
        tables are wider (0: none): the fused decode kernel's limit (16 by default), or 16
        (the prompt kernels' narrowest, tl.dot's minimum) without it. Rank-8 adapters in
        tables for rank 64 (the server's default) otherwise run tiles of 64 rank rows, most
        of them masked: session 17 on an H200, a mixed step of 237 decode rows and 5 prompts
        of 430 tokens, prompt LoRA 3.63 ms against 2.69 in tables for rank 8."""
        width = self.fused_max_rank if self.fused_decode else 16
        return width if self.narrow_tiles and width < self.max_rank else 0

    def slots_rank(self, slots: Iterable[int]) -> int:
        """The largest rank of the adapters in ``slots`` (0: none)."""
        return max((self.slot_ranks[s] for s in slots), default=0)

    def width_for(self, slots: Iterable[int]) -> int:
        """The ``max_rank`` of a LoRABatch over the adapters in ``slots``: ``small_rank``
        where each has ranks up to it, else the tables' width."""
        small = self.small_rank
        return small if small and self.slots_rank(slots) <= small else self.max_rank

    # ---- loading and eviction -------------------------------------------------------

    def pack(self, weights: LoRAWeights) -> PackedAdapter:
        """Lay ``weights`` out on the host as its pages will hold them. Thread-safe (no pool
        state); ValueError if a rank exceeds max_lora_rank."""
        self._check_ranks(weights)
        page = self.pool.page_elems
        matrices = _matrices(weights)
        runs, size = _layout(matrices, page)
        num_pages = -(-size // page)
        staging = self._staging.take(num_pages * page)
        self._fill(staging, matrices, runs)
        rel, ranks, scalings = self._rel_tables(weights, matrices, runs)
        # Split the offsets here, on the I/O thread; pin here too: the engine thread's part
        # of a load (``_tables``) is then one gather of a few page ids.
        rel_page = np.where(rel >= 0, rel // page, num_pages)
        rel_mod = np.where(rel >= 0, rel % page, 0)
        pin = self.device.type == "cuda"
        table = torch.empty(rel.shape, dtype=torch.int64, pin_memory=pin)
        ranks_t = torch.empty(ranks.shape, dtype=torch.int32, pin_memory=pin)
        scalings_t = torch.empty(scalings.shape, dtype=torch.float32, pin_memory=pin)
        ranks_t.numpy()[...] = ranks
        scalings_t.numpy()[...] = scalings
        return PackedAdapter(
            weights, staging, num_pages, rel_page, rel_mod, ranks_t, scalings_t, table
        )

    def discard(self, packed: PackedAdapter) -> None:
        """Give back the staging buffer of a packed adapter that will not be loaded."""
        self._staging.give_back(packed.staging, None)

    def load(
        self,
        adapter: LoRAWeights | PackedAdapter,
        protect: Collection[str] = (),
        keep: bool = False,
    ) -> bool:
        """Make the adapter resident, evicting idle adapters (least recently used first)
        but none named in ``protect``. False (nothing changed; a packed adapter's staging
        buffer is given back unless ``keep``) if the pool or the slots cannot take it now."""
        if adapter.name in self._resident:
            if isinstance(adapter, PackedAdapter):
                self.discard(adapter)
            return True
        packed = adapter if isinstance(adapter, PackedAdapter) else self.pack(adapter)
        pages = None
        self._protected = protect
        try:
            if self._free_slots or self._evict_one():
                pages = self.pool.allocate(packed.num_pages, PageKind.ADAPTER, oldest=True)
        finally:
            self._protected = ()
        if pages is None:
            if not keep:
                self.discard(packed)
            return False
        slot = self._free_slots.pop()
        entries = list(packed.weights.module_entries())
        self.slot_targets[slot] = target_mask(t for _, t, _, _ in entries)
        self.slot_ranks[slot] = max((r for _, _, r, _ in entries), default=0)
        resident = ResidentAdapter(packed.name, slot, pages, packed.weights.nbytes)
        self._copy_to_device(resident, packed)
        self._resident[packed.name] = resident
        self.stats.gpu_loads += 1
        self.stats.bytes_loaded += packed.weights.nbytes
        return True

    def evict(self, name: str) -> None:
        """Drop an idle adapter from the pool (e.g. when it is unregistered)."""
        adapter = self._resident[name]
        if adapter.refcount:
            raise RuntimeError(f"adapter {name!r} is in use by {adapter.refcount} requests")
        self._drop(adapter)

    def _reclaim(self, n: int) -> int:
        freed = 0
        while freed < n:
            got = self._evict_one()
            if not got:
                break
            freed += got
        return freed

    def _evict_one(self) -> int:
        for adapter in self._resident.values():  # least recently used first
            if adapter.refcount == 0 and adapter.name not in self._protected:
                self.stats.gpu_evictions += 1
                return self._drop(adapter)
        return 0

    def _drop(self, adapter: ResidentAdapter) -> int:
        if adapter.ready_event is not None:
            adapter.ready_event.synchronize()
        del self._resident[adapter.name]
        # On the copy stream, before the next adapter's tables in this slot (a step still
        # queued may read the slot: only for rows it computes and drops)
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            self.ranks[adapter.slot] = 0
        self.slot_targets[adapter.slot] = 0
        self.slot_ranks[adapter.slot] = 0
        self.pool.free(adapter.pages)
        self._free_slots.append(adapter.slot)
        return len(adapter.pages)

    def _check_ranks(self, weights: LoRAWeights) -> None:
        for layer, target, rank, _ in weights.module_entries():
            if rank > self.max_rank:
                raise ValueError(
                    f"adapter {weights.name!r} has rank {rank} at layer {layer} "
                    f"{target}; this engine serves ranks up to max_lora_rank={self.max_rank}"
                )

    # ---- packing ----------------------------------------------------------------------

    @staticmethod
    def _fill(staging: torch.Tensor, matrices: list[_Matrix], runs: list[_Run]) -> None:
        """Every run's rows to its place, in one call. A FlatLoRA's rows (and B^T's rows as
        the columns of a stored B) are addressed through numpy views of the bits of its
        values and of the staging buffer, so building the call's arguments gives up the GIL
        not once (see FlatLoRA); other adapters' through a 2-D view of the buffer per run.
        Runs of flat rows that continue each other in both the values and the buffer are
        one copy (a generated adapter: one per stretch of pages, not one per matrix), so
        little Python runs per adapter on an I/O thread that shares the GIL with the
        engine's."""
        flat = next((m.flat for m in matrices if m.rows is None), None)
        if flat is not None:
            stage, values = _bits(staging), _bits(flat)
        dsts, srcs = [], []
        span = [0, 0, 0]  # contiguous flat rows not yet added: [position, flat offset, size]

        def add_span() -> None:
            pos, start, size = span
            if size:
                dsts.append(torch.from_numpy(stage[pos : pos + size]))
                srcs.append(torch.from_numpy(values[start : start + size]))
            span[2] = 0

        for run in runs:
            m = matrices[run.matrix]
            n = run.row_end - run.row_start
            if m.rows is not None:
                dsts.append(staging[run.pos : run.pos + n * m.width].view(n, m.width))
                srcs.append(m.rows[run.row_start : run.row_end])
            elif m.transposed:  # B as stored, [width, num_rows]: B^T's rows are its columns
                b = values[m.offset : m.offset + m.width * m.num_rows].reshape(m.width, m.num_rows)
                src = b.T[run.row_start : run.row_end]
                dst = stage[run.pos : run.pos + n * m.width].reshape(n, m.width)
                dsts.append(torch.from_numpy(dst))
                srcs.append(torch.from_numpy(src))
            else:  # rows in the flat values: one copy for every run that continues the last
                start, size = m.offset + run.row_start * m.width, n * m.width
                pos, first, pending = span
                if pending and pos + pending == run.pos and first + pending == start:
                    span[2] += size
                else:
                    add_span()
                    span[:] = [run.pos, start, size]
        add_span()
        torch._foreach_copy_(dsts, srcs)

    def _rel_tables(
        self, weights: LoRAWeights, matrices: list[_Matrix], runs: list[_Run]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row positions in the adapter's own pages, ranks and scalings, on the host (numpy:
        no torch call, so no wait for the GIL on a thread beside the engine's)."""
        shape = tuple(self.row_offsets.shape[1:])  # [layers, targets, 2, max_rank]
        table = np.full(shape, -1, dtype=np.int64)
        # Per run: flat table index of its first row, its length, position and row width.
        first, count, pos, width = [], [], [], []
        for run in runs:
            m = matrices[run.matrix]
            first.append(((m.layer * shape[1] + m.target) * 2 + m.ab) * shape[3] + run.row_start)
            count.append(run.row_end - run.row_start)
            pos.append(run.pos)
            width.append(m.width)
        first_a, counts, pos_a, width_a = (
            np.array(v, dtype=np.int64) for v in (first, count, pos, width)
        )
        run_of_row = np.repeat(np.arange(len(runs)), counts)
        starts = np.cumsum(counts) - counts
        j = np.arange(int(counts.sum())) - starts[run_of_row]  # row index within its run
        table.reshape(-1)[first_a[run_of_row] + j] = pos_a[run_of_row] + j * width_a[run_of_row]
        ranks = np.zeros(shape[:2], dtype=np.int32)
        scalings = np.zeros(shape[:2], dtype=np.float32)
        for layer, target, r, scaling in weights.module_entries():
            t = LORA_TARGETS.index(target)
            ranks[layer, t] = r
            scalings[layer, t] = scaling
        return table, ranks, scalings

    def _tables(
        self, packed: PackedAdapter, pages: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapter's slot of the row-offset, rank and scaling tables, on the host (numpy
        on buffers pinned by ``pack``: no torch call, so no GIL hand-off to the I/O threads)."""
        page = self.pool.page_elems
        firsts = np.array([*pages, 0], dtype=np.int64) * page  # the last: rows it lacks
        table = packed.table.numpy()
        np.take(firsts, packed.rel_page, out=table)
        table += packed.rel_mod
        return packed.table, packed.ranks, packed.scalings

    def _copy_to_device(self, adapter: ResidentAdapter, packed: PackedAdapter) -> None:
        """Pages and table rows, host -> device. On CUDA everything goes on the side stream
        from pinned memory, so the host never waits for the step the device is computing."""
        page = self.pool.page_elems
        staging = packed.staging
        tables = self._tables(packed, adapter.pages)
        targets = (
            self.row_offsets[adapter.slot],
            self.ranks[adapter.slot],
            self.scalings[adapter.slot],
        )
        # One copy per run of consecutive page ids (freshly freed pages often are): fewer
        # copy launches on the engine thread.
        copies = [
            (self.pool.buffer[p : p + n], staging[k * page : (k + n) * page].view(n, page))
            for k, p, n in _page_runs(adapter.pages)
        ]
        if self._stream is None:
            for dst, src in copies:
                dst.copy_(src)
            for dst, src in zip(targets, tables, strict=True):
                dst.copy_(src)
            self._staging.give_back(staging, None)
            return
        # The pages may hold KV that a step still queued writes (a finished request's last
        # row): order after the work enqueued before they were freed.
        fence = self.pool.fence_for(adapter.pages)
        if fence is not None:
            self._stream.wait_event(fence)
        with torch.cuda.stream(self._stream):
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
            for dst, src in zip(targets, tables, strict=True):
                dst.copy_(src, non_blocking=True)
            adapter.ready_event = torch.cuda.Event()
            adapter.ready_event.record(self._stream)
        adapter.host_tables = tables  # alive until the copy has completed
        self._staging.give_back(staging, adapter.ready_event)

    def check_integrity(self) -> None:
        pages = [p for a in self._resident.values() for p in a.pages]
        assert len(pages) == len(set(pages)), "an adapter page is owned twice"
        assert self.pool.num_used(PageKind.ADAPTER) == len(pages), (
            f"{self.pool.num_used(PageKind.ADAPTER)} adapter pages in the pool, "
            f"{len(pages)} held by resident adapters"
        )
        slots = [a.slot for a in self._resident.values()]
        assert len(slots) == len(set(slots)) and not set(slots) & set(self._free_slots)
        assert all(a.refcount >= 0 for a in self._resident.values())


def _page_runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """(index of the run's first page in ``pages``, its first page id, its length) for each
    run of consecutive page ids, in order."""
    runs: list[tuple[int, int, int]] = []
    for k, p in enumerate(pages):
        if runs and runs[-1][1] + runs[-1][2] == p:
            first, start, n = runs[-1]
            runs[-1] = (first, start, n + 1)
        else:
            runs.append((k, p, 1))
    return runs


@dataclass
class _Matrix:
    layer: int
    target: int  # index into LORA_TARGETS
    ab: int  # 0 = A rows, 1 = B^T rows
    num_rows: int  # r
    width: int
    rows: torch.Tensor | None  # [r, width]; None: ``flat[offset:]`` holds them
    flat: torch.Tensor | None = None
    offset: int = 0
    transposed: bool = False  # flat: ``flat[offset:]`` holds [width, r] (B as stored)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's elements (2-byte floats as int16 bits)."""
    return (t.view(torch.int16) if t.element_size() == 2 else t).numpy()


@dataclass
class _Run:
    """Rows ``row_start:row_end`` of one matrix, contiguous from virtual position ``pos``."""

    matrix: int
    row_start: int
    row_end: int
    pos: int


def _matrices(weights: LoRAWeights) -> list[_Matrix]:
    out = []
    if weights.flat is not None:
        values = weights.flat.values
        for e in sorted(
            weights.flat.entries, key=lambda e: (e.layer, LORA_TARGETS.index(e.target))
        ):
            t = LORA_TARGETS.index(e.target)
            out += [
                _Matrix(e.layer, t, 0, e.rank, e.in_features, None, values, e.a_offset),
                _Matrix(
                    e.layer, t, 1, e.rank, e.out_features, None, values, e.b_offset, not e.b_rows
                ),
            ]
        return out
    for layer, target in sorted(weights.modules, key=lambda k: (k[0], LORA_TARGETS.index(k[1]))):
        module = weights.modules[(layer, target)]
        t = LORA_TARGETS.index(target)
        a, b_t = module.a, module.b.t()
        out += [
            _Matrix(layer, t, 0, a.shape[0], a.shape[1], a),
            _Matrix(layer, t, 1, b_t.shape[0], b_t.shape[1], b_t),
        ]
    return out


def _layout(matrices: list[_Matrix], page: int) -> tuple[list[_Run], int]:
    """Place rows one after another; a row never crosses a page end. Returns the runs and
    the virtual size in elements."""
    runs: list[_Run] = []
    pos = 0
    for i, m in enumerate(matrices):
        r, width = m.num_rows, m.width
        j = 0
        while j < r:
            room = page - pos % page
            if room < width:
                pos += room
                room = page
            n = min(r - j, room // width)
            runs.append(_Run(i, j, j + n, pos))
            pos += n * width
            j += n
    return runs, pos


class _StagingPool:
    """Reusable host staging buffers (pinned on CUDA: pinning a fresh buffer per adapter
    costs far more than the copy). A buffer is reused once the copy that read it is done."""

    def __init__(self, dtype: torch.dtype, pinned: bool) -> None:
        self.dtype = dtype
        self.pinned = pinned
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        # New buffers made (pinning host memory is slow, and may hold the CUDA driver's lock).
        self.allocations = 0
        self.allocated_bytes = 0
        self.allocation_seconds = 0.0
        self._lock = threading.Lock()  # taken on the adapter I/O thread, given back on the engine's
        self._largest = 0  # elements: the largest buffer asked for so far

    def take(self, numel: int) -> torch.Tensor:
        """A free buffer of at least ``numel`` elements: the smallest that fits (a large one
        stays for a large adapter), else a new one as large as the largest asked for so
        far, so that every buffer made after the first large adapter fits any adapter."""
        with self._lock:
            self._largest = max(self._largest, numel)
            fits = [
                (buf.numel(), i)
                for i, (buf, event) in enumerate(self._buffers)
                if buf.numel() >= numel and (event is None or event.query())
            ]
            if fits:
                buf, _ = self._buffers.pop(min(fits)[1])
                return buf[:numel]
            size = self._largest
        return self._make(size)[:numel]

    def reserve(self, count: int) -> int:
        """Up to ``count`` free buffers of the largest size asked for so far (none before a
        first ``take``), as ``take`` would make them. Returns how many were made."""
        with self._lock:
            largest = self._largest
            free = sum(1 for buf, _ in self._buffers if buf.numel() >= largest)
        made = max(0, count - free) if largest else 0
        for _ in range(made):
            self.give_back(self._make(largest), None)
        return made

    def _make(self, size: int) -> torch.Tensor:
        """A new buffer of at least 4 Mi elements (pinned on CUDA: slow), counted."""
        start = time.perf_counter()
        buf = torch.empty(max(size, 1 << 22), dtype=self.dtype, pin_memory=self.pinned)
        with self._lock:
            self.allocations += 1
            self.allocated_bytes += buf.numel() * buf.element_size()
            self.allocation_seconds += time.perf_counter() - start
        return buf

    def give_back(self, buf: torch.Tensor, event: torch.cuda.Event | None) -> None:
        base = buf._base if buf._base is not None else buf
        with self._lock:
            self._buffers.append((base, event))
