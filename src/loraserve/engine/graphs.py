"""Decode steps with static shapes, replayed as CUDA graphs.

A decode step launches a few hundred small kernels; from Python each launch costs tens of
microseconds of host time, far more than the kernels' device time at 7B (docs/benchmarks.md).
A CUDA graph replays the whole forward with one launch. Graphs need fixed shapes and fixed
addresses, so a decode batch of B requests is padded to the next captured size P >= B:

    rows 0..B-1   the requests, one token each (input id, position, KV slot, block table)
    rows B..P-1   padding: token 0 at position 0, KV written to a reserved scratch page that
                  no sequence owns, context length 1, LoRA slot -1 (no adapter work)

LoRA segments are inputs too, so the same graph serves any mix of adapters; the adapter
tables are the AdapterCache's own tensors, whose addresses never change. Each row is a
segment of its own (-1 for base-model rows), for the matrix-vector kernels (or the padded
bmm ablation). With ``group_lora`` (the default with the Triton kernels) every size also
has graphs in which each run of one adapter's rows (the runner sorts rows by adapter) is
one segment, taken in 16-row tiles (a host-built map of the live tiles and their count:
persistent grids), so each adapter's weights are read once per step, not once per row. A
step replays those when its rows share adapters enough: when ``group_tile_cost`` times its
16-row tiles is less than its adapter rows (a tile costs about three single-row programs:
on an H200, S2's ranks over 256 rows of 52 adapters add 2.34 ms to a step grouped against
3.56 per row, over 251 rows of 92 adapters 4.09 against 3.84; S2 n=2000, where nearly
every row has its own adapter, ran 15.5 vs 21.2 req/s grouped always; docs/benchmarks.md,
sessions 7 and 14).

Inputs are copied into static buffers before each replay; the logits come out of a static
buffer and are sampled outside the graph (per-request seeded generators cannot be captured).

On the CPU (tests) the padded batch runs eagerly: everything but the capture is exercised.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from loraserve.config import ALL_TARGETS, QKVO_TARGETS
from loraserve.kernels.lora import GROUP_TILE_ROWS, LoRABatch
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.kv_cache import kv_slot
from loraserve.model.batch import ForwardBatch, LoRAInputs
from loraserve.model.llama import LlamaForCausalLM
from loraserve.request import Request

logger = logging.getLogger(__name__)


def is_decode_row(request: Request, num_scheduled: int) -> bool:
    """The request computes its last token this step and samples the next: a graph row."""
    return num_scheduled == 1 and request.num_computed_tokens + 1 == request.num_tokens


def lora_target_sets(cache: AdapterCache) -> list[int]:
    """The LoRA target sets (bits of LORA_TARGETS) a graph is captured for: none (base-model
    batches), q,k,v,o (S-LoRA's adapters), all. A step replays the smallest covering its
    adapters' targets (``covering_targets``)."""
    return sorted({0, QKVO_TARGETS, ALL_TARGETS} if cache.max_loras else {0})


def covering_targets(cache: AdapterCache, target_sets: list[int], requests: list[Request]) -> int:
    """The smallest of ``target_sets`` that covers the requests' adapters' targets."""
    needed = 0
    slot_targets = cache.slot_targets
    for r in requests:
        if r.adapter_slot is not None:
            needed |= slot_targets[r.adapter_slot]
    return next(t for t in target_sets if needed & ~t == 0)


# A step replays the grouped LoRA graphs when this many times its 16-row tiles is less than
# its adapter rows: a tile costs about three single-row programs of the matrix-vector
# kernels and saves a read of its adapter for each further row in it. Session 14's decode
# probe on an H200 (S2's ranks 64/32/16/8, LoRA's extra ms per step, grouped / per row):
# 256 rows on 52 adapters (~4.4 rows per tile) 2.34 / 3.56; 251 rows on 92 (~2.6 rows per
# tile) 4.09 / 3.84, which S2 n = 100's saturated run confirmed (0.831 of base grouped,
# 0.857 per row). The break-even is near 3 rows per tile. (Until session 14: 1.6, from
# session 7's rank-16 sweep, before the per-row kernels got faster.)
GROUP_TILE_COST = 3.0


def capture(
    device: torch.device, pool, forward: Callable[[], torch.Tensor], out: torch.Tensor | None
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph, out): ``forward`` run once on a side stream (compiles kernels, sets up
    workspaces), then captured into a graph that copies its result into ``out`` (made
    from the warm-up's result when None).

    Python's cyclic garbage collector is off while it runs: a collection inside the capture
    that frees an earlier engine's graphs (cudaGraphExecDestroy) invalidates the capture
    (the H200 saw this when one process built several engines; the engine collects once
    before it captures, not here: a collection per capture is slow). Errors are checked
    per thread, so the adapter I/O threads' pinned-memory calls cannot break it either."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            result = forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        if out is None:
            out = torch.empty_like(result)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out.copy_(forward())
    finally:
        if enabled:
            gc.enable()
    return graph, out


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to ``max_batch`` (as vLLM does)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch]
    sizes += list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


@dataclass
class _Static:
    """The fixed-address inputs and output of one captured size.

    The integer inputs are views into one device buffer ``inputs`` [head + max_blocks, size]
    (rows: input ids, positions, KV slots, context lengths, LoRA segment slots, segment
    starts, logits rows, with grouped LoRA the tile map (its live count, then its entries),
    then from row ``head`` the block table transposed), so a step's inputs travel in one
    copy from a pinned host buffer.
    There are two host buffers, used in turn: with overlapped steps the host fills step N+1
    while step N's copy may still be queued behind step N-1.
    """

    batch: ForwardBatch
    inputs: torch.Tensor
    hosts: list[torch.Tensor]
    head: int  # the first row of the block tables in ``inputs``
    # What each row of a host buffer's block tables holds: (request id, table length), or
    # None for the scratch page only. Consecutive decode steps mostly keep every row as it was.
    tables: list[list[tuple[str, int] | None]] = field(default_factory=lambda: [[], []])
    copied: list[torch.cuda.Event | None] = field(default_factory=lambda: [None, None])
    turn: int = 0  # the host buffer the next fill uses
    logits: torch.Tensor | None = None  # [size, vocab] fp32, written by every variant
    # by (LoRA targets, LoRA form: PER_ROW, GROUPED or SMALL_RANKS)
    graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = field(default_factory=dict)
    # LoRA metadata over the same segment tensors, by form: one segment per row (PER_ROW),
    # grouped by adapter in 16-row tiles (GROUPED, with group_lora), one segment per row
    # with tiles for ranks up to DecodeGraphs.small_rank (SMALL_RANKS)
    metas: dict[int, LoRABatch] = field(default_factory=dict)


# The forms of a step's LoRA (the graphs captured for each)
PER_ROW, GROUPED, SMALL_RANKS = 0, 1, 2


class DecodeGraphs:
    """Padded decode batches of sizes ``capture_sizes(max_batch)``."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        adapter_cache: AdapterCache,
        lora_backend: str,
        block_size: int,
        max_blocks: int,
        scratch_page: int,
        max_batch: int,
        device: torch.device,
        group_lora: bool = True,
    ) -> None:
        self.model = model
        self.cache = adapter_cache
        self.lora_backend = lora_backend
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.scratch_page = scratch_page
        self.sizes = capture_sizes(max_batch)
        self.device = device
        self.capture = device.type == "cuda"
        self._static: dict[int, _Static] = {}
        # One graph per size for each set of LoRA targets it launches kernels for.
        self.target_sets = lora_target_sets(adapter_cache)
        # Graphs with one segment per run of one adapter's rows (grouped tiles) too, for
        # steps whose rows share adapters; the padded bmm ablation keeps per-row gathers.
        self.group_lora = group_lora and lora_backend != "bmm" and adapter_cache.max_loras > 0
        self.group_tile_cost = GROUP_TILE_COST
        self.grouped_steps = 0  # steps that replayed the grouped graphs
        # Where the engine's tables are laid out for ranks above the fused decode kernel's
        # (fuses_decode), graphs with one segment per row and that kernel's tiles too, for
        # steps whose adapters all have ranks up to small_rank (0: none). Session 16 on an
        # H200, S1's rank-8 adapters in tables for rank 64 (the server's default): LoRA's
        # extra decode step time 1.42 ms with these graphs against 2.26 ms with two launches
        # (probe, same call), and S1 at n = 2000 0.940 of base against 0.896 (same trace).
        triton = lora_backend in ("auto", "triton") and adapter_cache.max_loras > 0
        small = triton and adapter_cache.fused_decode
        self.small_rank = adapter_cache.small_rank if small else 0
        self.small_steps = 0  # steps that replayed the small-rank graphs
        self._rows = np.arange(max_batch, dtype=np.int64)
        self.steps = 0  # decode steps served by the padded path
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def capture_all(self) -> None:
        """Capture every size now, largest first (smaller graphs reuse its memory), so no
        request waits for a capture later. On the CPU this only builds the static inputs."""
        start = time.perf_counter()
        for size in reversed(self.sizes):
            if size not in self._static:
                self._build(size)
        if self.capture:
            torch.cuda.synchronize(self.device)
            logger.info(
                "captured %d decode graphs (batch 1..%d, %d LoRA target sets%s) in %.1f s",
                sum(len(s.graphs) for s in self._static.values()),
                self.sizes[-1],
                len(self.target_sets),
                ", LoRA rows also grouped by adapter" if self.group_lora else "",
                time.perf_counter() - start,
            )

    def fits(self, requests: list[Request], counts: list[int]) -> bool:
        """A pure decode step: one new token per request, every request samples."""
        return len(requests) <= self.sizes[-1] and all(
            is_decode_row(r, n) for r, n in zip(requests, counts, strict=True)
        )

    def run(
        self, requests: list[Request], prev: tuple[torch.Tensor, list[int]] | None = None
    ) -> torch.Tensor:
        """Logits [len(requests), vocab] fp32 of one decode step.

        ``prev`` = (tokens, rows): the step continues one still in flight, whose sampled
        ``tokens`` (device) are each request's input, request i's at row rows[i]; every
        request is one token further than the host knows (its block table covers it).
        """
        self.steps += 1
        size = next(s for s in self.sizes if s >= len(requests))
        static = self._static.get(size) or self._build(size)
        targets = self.targets_for(requests)
        grouped = targets != 0 and self.groups_pay(requests)
        self.grouped_steps += grouped
        form = GROUPED if grouped else PER_ROW
        small = self.small_rank and targets and not grouped
        if small and self.step_rank(requests) <= self.small_rank:
            form = SMALL_RANKS
            self.small_steps += 1
        self._fill(static, requests, prev, grouped)
        graph = static.graphs.get((targets, form))
        if graph is None:
            self._select(static, targets, form)
            return self._forward(static)[: len(requests)]
        graph.replay()
        return static.logits[: len(requests)]

    def groups_pay(self, requests: list[Request]) -> bool:
        """Grouped LoRA rows for this step: ``group_tile_cost`` x its 16-row tiles (one per
        up to 16 rows of an adapter) is less than its adapter rows. 52 adapters over 256
        rows (~56 tiles): 168 < 256, grouped; 92 adapters over 251 rows: ~285 > 251, per
        row; one row per adapter: 3 n > n, per row; 16 rows of one adapter and 15 of their
        own: 48 > 31, per row."""
        if not self.group_lora:
            return False
        rows = Counter(r.adapter_slot for r in requests if r.adapter_slot is not None)
        if not rows:
            return False
        tiles = sum(-(-n // GROUP_TILE_ROWS) for n in rows.values())
        return self.group_tile_cost * tiles < sum(rows.values())

    def step_rank(self, requests: list[Request]) -> int:
        """The largest rank of the step's adapters (0: none)."""
        return self.cache.slots_rank(r.adapter_slot for r in requests if r.adapter_slot is not None)

    @staticmethod
    def _select(static: _Static, targets: int, form: int) -> None:
        static.batch.lora.targets = targets
        static.batch.lora.meta = static.metas[form]

    def targets_for(self, requests: list[Request]) -> int:
        return covering_targets(self.cache, self.target_sets, requests)

    def _forward(self, static: _Static) -> torch.Tensor:
        self._unpack(static)
        return self.model.compute_logits(self.model(static.batch))

    def _build(self, size: int) -> _Static:
        static = self._empty_static(size)
        self._static[size] = static
        if self.capture:
            for targets in reversed(self.target_sets):  # the largest graph first
                for form in static.metas if targets else (PER_ROW,):
                    self._capture(static, targets, form)
        return static

    def _capture(self, static: _Static, targets: int, form: int) -> None:
        self._fill(static, [], grouped=form == GROUPED)
        self._select(static, targets, form)
        forward = functools.partial(self._forward, static)
        graph, static.logits = capture(self.device, self._pool, forward, static.logits)
        static.graphs[(targets, form)] = graph
        logger.debug(
            "captured a decode graph: batch %d, targets %#x, LoRA form %d",
            static.batch.num_seqs,
            targets,
            form,
        )

    @staticmethod
    def _map_entries(size: int) -> int:
        """Most (segment, 16-row tile) pairs of a batch of ``size`` rows."""
        return size + -(-size // GROUP_TILE_ROWS)

    def _empty_static(self, size: int) -> _Static:
        entries = self._map_entries(size)
        map_rows = -(-(1 + 2 * entries) // size) if self.group_lora else 0
        head = 7 + map_rows
        inputs = torch.zeros((head + self.max_blocks, size), dtype=torch.int64, device=self.device)
        hosts = [
            torch.zeros(inputs.shape, dtype=torch.int64, pin_memory=self.capture) for _ in range(2)
        ]
        for t in (inputs, *hosts):  # segment starts (one per row until grouped), logits rows
            t[5:7] = torch.arange(size)
        # seq_lens, the LoRA segments and the block tables are int32 for the kernels: cast
        # from ``inputs`` by ``_unpack`` at the start of the forward (captured with the rest).
        meta = self.cache.lora_batch(
            torch.arange(size + 1, dtype=torch.int32, device=self.device),
            torch.zeros(size, dtype=torch.int32, device=self.device),
            max_seg_len=1,
        )
        metas = {PER_ROW: meta}
        if self.small_rank:  # the same segments, tiles for small ranks (kernels.lora)
            metas[SMALL_RANKS] = dataclasses.replace(meta, max_rank=self.small_rank)
        if self.group_lora:  # the same segment tensors, grouped by the fill
            tile_map = torch.zeros((entries, 2), dtype=torch.int32, device=self.device)
            metas[GROUPED] = dataclasses.replace(
                meta,
                max_seg_len=size,
                tile_maps=(tile_map, tile_map),  # the same 16-row tiles for both kernels
                tile_rows=(GROUP_TILE_ROWS, GROUP_TILE_ROWS),
                tile_count=torch.zeros(1, dtype=torch.int32, device=self.device),
                grouped_rows=size,
            )
        batch = ForwardBatch(
            input_ids=inputs[0],
            positions=inputs[1],
            slot_mapping=inputs[2],
            block_tables=torch.zeros(
                (size, self.max_blocks), dtype=torch.int32, device=self.device
            ),
            seq_lens=torch.zeros(size, dtype=torch.int32, device=self.device),
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            logits_indices=inputs[6],
            max_q_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            lora=LoRAInputs(self.cache.pool.buffer.view(-1), meta, self.lora_backend),
        )
        return _Static(batch, inputs, hosts, head, metas=metas)

    def _unpack(self, static: _Static) -> None:
        """Device-side: the int32 inputs from the int64 buffer (captured in the graph)."""
        batch, inputs, head = static.batch, static.inputs, static.head
        batch.seq_lens.copy_(inputs[3])
        meta = static.metas[PER_ROW]
        meta.seg_slot.copy_(inputs[4])
        if self.group_lora:  # every kind of graph copies the segments and the tile map
            grouped = static.metas[GROUPED]
            size = inputs.shape[1]
            meta.seg_start[:size].copy_(inputs[5])
            area = inputs[7:head].view(-1)
            grouped.tile_count.copy_(area[:1])
            grouped.tile_maps[0].view(-1).copy_(area[1 : 1 + grouped.tile_maps[0].numel()])
        batch.block_tables.copy_(inputs[head:].t())

    def _fill(
        self,
        static: _Static,
        requests: list[Request],
        prev: tuple[torch.Tensor, list[int]] | None = None,
        grouped: bool = False,
    ) -> None:
        """Write this step's inputs into a pinned host buffer and copy it to the device
        (rows past the requests: padding). With ``prev`` the input ids are gathered on the
        device from the in-flight step's sampled tokens."""
        turn = static.turn
        static.turn ^= 1
        if static.copied[turn] is not None:
            static.copied[turn].synchronize()  # its last copy (two steps ago) has run
        # numpy, not torch, on the host buffer: small numpy writes keep the GIL, while each
        # torch call releases it, and with the adapter I/O threads busy every release can
        # cost the engine thread a wait of up to the interpreter's switch interval.
        host = static.hosts[turn].numpy()
        n = len(requests)
        bs = self.block_size
        ahead = 0 if prev is None else 1  # tokens in flight that the host does not have
        host[:4, n:] = 0
        host[2, n:] = self.scratch_page * bs
        host[3, n:] = 1
        adapters: list[int] = []
        if n:
            rows: list[list[int]] = [[], [], [], []]
            ids, positions, slots, lens = rows
            for r in requests:
                p = r.num_tokens - 1 + ahead
                if prev is None:
                    ids.append(r.token_at(p))
                positions.append(p)
                slots.append(kv_slot(r, p, bs))
                lens.append(p + 1)
                adapters.append(-1 if r.adapter_slot is None else r.adapter_slot)
            if prev is not None:
                ids += prev[1]  # rows of the in-flight step's tokens, gathered below
            host[:4, :n] = rows
        if grouped:
            self._fill_groups(host, static.head, adapters)
        else:
            host[4, :n] = adapters
            host[4, n:] = -1
            host[5] = self._rows[: host.shape[1]]  # one segment per row
        self._fill_tables(host[static.head :], static.tables[turn], requests)
        static.inputs.copy_(static.hosts[turn], non_blocking=True)
        if self.capture:
            static.copied[turn] = torch.cuda.Event()
            static.copied[turn].record()
        if prev is not None and n:
            ids_row = static.inputs[0, :n]
            ids_row.copy_(prev[0].index_select(0, ids_row))

    @staticmethod
    def _fill_groups(host: np.ndarray, head: int, adapters: list[int]) -> None:
        """LoRA segments: one per run of equal adapter slots (the runner sorts rows by
        adapter), then empty ones of slot -1; the tile map: (segment, 16-row tile) of each
        adapter segment's tiles, after their count."""
        n = len(adapters)
        slots = np.asarray(adapters, dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]]) if n else slots
        groups = len(starts)
        host[4, :groups] = slots[starts]
        host[4, groups:] = -1
        host[5, :groups] = starts
        host[5, groups:] = n
        lengths = np.diff(np.r_[starts, n])
        tiles = np.where(slots[starts] >= 0, -(-lengths // GROUP_TILE_ROWS), 0)
        first = np.cumsum(tiles) - tiles  # each segment's first entry
        count = int(tiles.sum())
        area = host[7:head].reshape(-1)
        area[0] = count
        entries = area[1 : 1 + 2 * count].reshape(count, 2)
        entries[:, 0] = np.repeat(np.arange(groups), tiles)
        entries[:, 1] = np.arange(count) - np.repeat(first, tiles)

    def _fill_tables(self, tables: np.ndarray, state: list, requests: list[Request]) -> None:
        """The block tables, transposed into ``tables`` (the host buffer's rows 5..): only
        rows whose request or table length changed since that buffer's last fill (``state``)
        are rewritten (a table grows by one page every block_size tokens); unused entries and
        padding rows point at the scratch page."""
        if len(state) != tables.shape[1]:
            tables[:] = self.scratch_page
            state[:] = [None] * tables.shape[1]
        for i, r in enumerate(requests):
            key = (r.request_id, len(r.block_table))
            if state[i] == key:
                continue
            if state[i] is not None and state[i][0] != r.request_id:
                tables[:, i] = self.scratch_page  # another request's longer table
            tables[: key[1], i] = r.block_table
            state[i] = key
        for i in range(len(requests), len(state)):
            if state[i] is not None:
                tables[:, i] = self.scratch_page
                state[i] = None
