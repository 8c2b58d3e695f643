"""Decode steps with static shapes, replayed as CUDA graphs.

A decode step launches a few hundred small kernels; from Python each launch costs tens of
microseconds of host time, far more than the kernels' device time at 7B (docs/benchmarks.md).
A CUDA graph replays the whole forward with one launch. Graphs need fixed shapes and fixed
addresses, so a decode batch of B requests is padded to the next captured size P >= B:

    rows 0..B-1   the requests, one token each (input id, position, KV slot, block table)
    rows B..P-1   padding: token 0 at position 0, KV written to a reserved scratch page that
                  no sequence owns, context length 1, LoRA slot -1 (no adapter work)

LoRA runs as one segment per row with the row's adapter slot (-1 for base-model rows), so the
same graph serves any mix of adapters; the adapter tables are the AdapterCache's own tensors,
whose addresses never change. Inputs are copied into static buffers before each replay; the
logits come out of a static buffer and are sampled outside the graph (per-request seeded
generators cannot be captured).

On the CPU (tests) the padded batch runs eagerly: everything but the capture is exercised.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from loraserve.kernels.lora import LoRABatch
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.kv_cache import kv_slot
from loraserve.model.batch import ForwardBatch, LoRAInputs
from loraserve.model.llama import LlamaForCausalLM
from loraserve.request import Request

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to ``max_batch`` (as vLLM does)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch]
    sizes += list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


@dataclass
class _Static:
    """The fixed-address inputs and output of one captured size."""

    batch: ForwardBatch
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


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
                "captured %d decode graphs (batch 1..%d) in %.1f s",
                len(self.sizes),
                self.sizes[-1],
                time.perf_counter() - start,
            )

    def fits(self, requests: list[Request], counts: list[int]) -> bool:
        """A pure decode step: one new token per request, every request samples."""
        return (
            len(requests) <= self.sizes[-1]
            and all(n == 1 for n in counts)
            and all(r.num_computed_tokens + 1 == r.num_tokens for r in requests)
        )

    def run(self, requests: list[Request]) -> torch.Tensor:
        """Logits [len(requests), vocab] fp32 of one decode step."""
        self.steps += 1
        size = next(s for s in self.sizes if s >= len(requests))
        static = self._static.get(size) or self._build(size)
        self._fill(static.batch, requests)
        if static.graph is None:
            return self._forward(static.batch)[: len(requests)]
        static.graph.replay()
        return static.logits[: len(requests)]

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.compute_logits(self.model(batch))

    def _build(self, size: int) -> _Static:
        static = _Static(self._empty_batch(size))
        self._static[size] = static
        if self.capture:
            self._capture(static)
        return static

    def _capture(self, static: _Static) -> None:
        self._fill(static.batch, [])
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, sets up workspaces
            self._forward(static.batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static.logits = self._forward(static.batch)
        static.graph = graph
        logger.debug("captured a decode graph for batch %d", static.batch.num_seqs)

    def _empty_batch(self, size: int) -> ForwardBatch:
        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device)

        meta = LoRABatch(
            seg_start=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            seg_slot=zeros(size),
            row_offsets=self.cache.row_offsets,
            ranks=self.cache.ranks,
            scalings=self.cache.scalings,
            max_rank=self.cache.max_rank,
            max_seg_len=1,
            num_segments=size,
            row_align=self.cache.row_align,
        )
        return ForwardBatch(
            input_ids=zeros(size, dtype=torch.int64),
            positions=zeros(size, dtype=torch.int64),
            slot_mapping=zeros(size, dtype=torch.int64),
            block_tables=zeros(size, self.max_blocks),
            seq_lens=zeros(size),
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            logits_indices=torch.arange(size, dtype=torch.int64, device=self.device),
            max_q_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            lora=LoRAInputs(self.cache.pool.buffer.view(-1), meta, self.lora_backend),
        )

    def _fill(self, batch: ForwardBatch, requests: list[Request]) -> None:
        """Copy this step's inputs into the static buffers (rows past the requests: padding)."""
        size = batch.num_seqs
        pad = size - len(requests)
        scratch = self.scratch_page * self.block_size
        positions = [r.num_tokens - 1 for r in requests]
        rows = {
            batch.input_ids: [r.token_at(p) for r, p in zip(requests, positions, strict=True)]
            + [0] * pad,
            batch.positions: positions + [0] * pad,
            batch.slot_mapping: [
                kv_slot(r, p, self.block_size) for r, p in zip(requests, positions, strict=True)
            ]
            + [scratch] * pad,
            batch.seq_lens: [p + 1 for p in positions] + [1] * pad,
            batch.lora.meta.seg_slot: [
                -1 if r.adapter_slot is None else r.adapter_slot for r in requests
            ]
            + [-1] * pad,
        }
        for target, values in rows.items():
            target.copy_(torch.tensor(values, dtype=target.dtype), non_blocking=True)
        tables = torch.full((size, self.max_blocks), self.scratch_page, dtype=torch.int32)
        for i, r in enumerate(requests):
            tables[i, : len(r.block_table)] = torch.tensor(r.block_table, dtype=torch.int32)
        batch.block_tables.copy_(tables, non_blocking=True)
