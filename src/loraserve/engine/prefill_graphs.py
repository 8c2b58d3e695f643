"""The prompt rows of a step, padded to a fixed shape and replayed as CUDA graphs.

An eager forward pass makes about 15 launches per layer plus the LoRA kernels': at 7B with
adapters that was 46-121 ms of host time per mixed step on the H200 hosts, more than the
device needed for the step's few prompts (docs/benchmarks.md, sessions 5 and 6). With prefill
graphs (on by default with CUDA graphs) a step's prompt rows run as graph replays instead, up
to ``MAX_SEQS`` sequences and the largest bucket of tokens each, up to ``MAX_GROUPS`` replays
a step; its decode rows replay the decode graphs (graphs.py) before them.

A bucket of T tokens and S = MAX_SEQS sequences:

    tokens 0..N-1     the prompts' new tokens, sequence after sequence (rows of one adapter
                      side by side: one LoRA segment per run)
    tokens N..T-1     padding: token 0 at position 0, KV written to the scratch page, in no
                      sequence (attention and LoRA never touch them; their hidden rows are
                      computed and dropped)
    sequences n..S-1  padding: no tokens (query start N), context 0, LoRA slot -1

The attention and LoRA prefill kernels run over tile maps the host fills each step: the
(sequence, query block) and (segment, row tile) pairs that have rows, padded with -1 to the
worst case (about T / tile + S entries), so a graph for T tokens launches a few programs per
real tile, not S x T / tile of them. Only the rows of sequences that sample get logits.

On the CPU (tests) the padded batch runs eagerly: everything but the capture is exercised.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from loraserve.engine.graphs import capture, covering_targets, lora_target_sets
from loraserve.kernels.attention import attention_tile_tokens
from loraserve.kernels.lora import lora_tile_rows
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.model.batch import ForwardBatch, LoRAInputs
from loraserve.model.llama import LlamaForCausalLM
from loraserve.request import Request

logger = logging.getLogger(__name__)

MAX_SEQS = 8  # prompt sequences per replay
MAX_GROUPS = 4  # replays per step; a step whose prompt rows need more runs them eagerly
_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def token_buckets(max_tokens: int) -> list[int]:
    """Captured token counts: 64 .. 4096 in steps of about 1.5x, up to ``max_tokens``."""
    sizes = [b for b in _BUCKETS if b <= max_tokens]
    return sizes or [max_tokens]


@dataclass
class _Static:
    """Fixed-address inputs and output of one bucket. The int64 device buffer ``inputs``
    holds, in order: input ids, positions, KV slots [T]; context lengths [S]; query starts
    [S + 1]; logits rows [S]; LoRA segment starts [S + 1], slots [S]; block tables [S, B]."""

    tokens: int
    maps: dict[str, tuple[int, int]]  # name -> (entries, rows per tile)
    layout: dict[str, slice]  # where each input lives in ``inputs``
    batch: ForwardBatch
    inputs: torch.Tensor
    hosts: list[torch.Tensor]
    copied: list[torch.cuda.Event | None] = field(default_factory=lambda: [None, None])
    turn: int = 0
    logits: torch.Tensor | None = None  # [S, vocab] fp32
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)  # by LoRA targets


class PrefillGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        adapter_cache: AdapterCache,
        lora_backend: str,
        block_size: int,
        max_blocks: int,
        scratch_page: int,
        max_tokens: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.cache = adapter_cache
        self.lora_backend = lora_backend
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.scratch_page = scratch_page
        self.sizes = token_buckets(max_tokens)
        self.device = device
        self.capture = device.type == "cuda"
        self.target_sets = lora_target_sets(adapter_cache)
        # Every bucket also with LoRA tiles for small ranks where the tables are wider
        # (AdapterCache.width_for): rank-8 adapters in tables for rank 64 (the server's
        # default) otherwise run 64-row tiles. Session 17 on an H200, 5 prompts of 430
        # tokens beside 237 decode rows (eager): prompt LoRA 3.63 ms in tables for rank 64
        # against 2.69 in tables for rank 8.
        small = adapter_cache.small_rank if adapter_cache.max_loras else 0
        self.widths = [adapter_cache.max_rank] + ([small] if small else [])
        self._static: dict[tuple[int, int], _Static] = {}  # by (tokens, width)
        self.steps = 0  # replays (or padded eager passes) this served
        self.small_steps = 0  # ... of them with the small-rank tiles
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (smaller ones reuse its memory)."""
        start = time.perf_counter()
        for size in reversed(self.sizes):
            for width in self.widths:
                if (size, width) not in self._static:
                    self._build(size, width)
        if self.capture:
            torch.cuda.synchronize(self.device)
            logger.info(
                "captured %d prefill graphs (%d..%d tokens, up to %d prompts) in %.1f s",
                len(self.sizes) * len(self.target_sets) * len(self.widths),
                self.sizes[0],
                self.sizes[-1],
                MAX_SEQS,
                time.perf_counter() - start,
            )

    def groups(self, counts: list[int]) -> list[list[int]] | None:
        """Consecutive rows (by index into ``counts``, their new tokens) cut into groups that
        one replay each takes (at most MAX_SEQS rows and the largest bucket's tokens), or
        None when a row is larger than a bucket or more than MAX_GROUPS replays would be
        needed (then the rows run eagerly). Each further replay reads the weights again: a
        few ms, against tens of ms of host time for an eager pass."""
        groups: list[list[int]] = []
        tokens = 0
        for i, n in enumerate(counts):
            if n > self.sizes[-1]:
                return None
            if not groups or len(groups[-1]) == MAX_SEQS or tokens + n > self.sizes[-1]:
                groups.append([])
                tokens = 0
            groups[-1].append(i)
            tokens += n
        return groups if 0 < len(groups) <= MAX_GROUPS else None

    def run(self, requests: list[Request], counts: list[int]) -> tuple[torch.Tensor, list[Request]]:
        """(logits [len(sampling), vocab] fp32, sampling): the requests whose new tokens reach
        their end, which sample, in the logits' order. ``requests`` must be ordered by
        adapter (rows of one adapter side by side)."""
        self.steps += 1
        size = next(s for s in self.sizes if s >= sum(counts))
        width = self.widths[0]
        if len(self.widths) > 1:
            slots = [r.adapter_slot for r in requests if r.adapter_slot is not None]
            width = self.cache.width_for(slots)
            self.small_steps += width != self.widths[0]
        static = self._static.get((size, width)) or self._build(size, width)
        sampling = self._fill(static, requests, counts)
        targets = covering_targets(self.cache, self.target_sets, requests)
        graph = static.graphs.get(targets)
        if graph is None:
            static.batch.lora.targets = targets
            return self._forward(static)[: len(sampling)], sampling
        graph.replay()
        return static.logits[: len(sampling)], sampling

    def _forward(self, static: _Static) -> torch.Tensor:
        self._unpack(static)
        return self.model.compute_logits(self.model(static.batch))

    def _build(self, size: int, width: int) -> _Static:
        static = self._empty_static(size, width)
        self._static[(size, width)] = static
        if self.capture:
            for targets in reversed(self.target_sets):
                self._capture(static, targets)
        return static

    def _capture(self, static: _Static, targets: int) -> None:
        self._fill(static, [], [])
        static.batch.lora.targets = targets
        forward = functools.partial(self._forward, static)
        graph, static.logits = capture(self.device, self._pool, forward, static.logits)
        static.graphs[targets] = graph

    def _maps(self, tokens: int, width: int) -> dict[str, tuple[int, int]]:
        """Tile maps of a bucket with LoRA tiles for ``width``: name -> (entries, rows per
        tile)."""
        attn = self.model.layers[0].attn
        rows = {"attn_map": attention_tile_tokens(attn.num_heads, attn.k_cache.shape[2], tokens)}
        if self.cache.max_loras:
            shrink, expand = lora_tile_rows(width, tokens, MAX_SEQS)
            rows |= {"shrink_map": shrink, "expand_map": expand}
        return {k: (-(-tokens // r) + MAX_SEQS, r) for k, r in rows.items()}

    def _layout(self, tokens: int, width: int) -> dict[str, slice]:
        """Where each input lives in the flat int64 buffer."""
        s, b = MAX_SEQS, self.max_blocks
        lengths = [
            ("ids", tokens),
            ("positions", tokens),
            ("slots", tokens),
            ("seq_lens", s),
            ("starts", s + 1),
            ("logits", s),
            ("seg_start", s + 1),
            ("seg_slot", s),
            *((name, 2 * n) for name, (n, _) in self._maps(tokens, width).items()),
            ("tables", s * b),
        ]
        out, at = {}, 0
        for name, n in lengths:
            out[name] = slice(at, at + n)
            at += n
        return out

    def _empty_static(self, tokens: int, width: int) -> _Static:
        layout = self._layout(tokens, width)
        total = layout["tables"].stop
        inputs = torch.zeros(total, dtype=torch.int64, device=self.device)
        hosts = [torch.zeros(total, dtype=torch.int64, pin_memory=self.capture) for _ in range(2)]

        def i32(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int32, device=self.device)

        maps = self._maps(tokens, width)
        meta = self.cache.lora_batch(i32(MAX_SEQS + 1), i32(MAX_SEQS), tokens, width)
        if "shrink_map" in maps:
            meta.tile_maps = tuple(
                i32(2 * maps[k][0]).view(-1, 2) for k in ("shrink_map", "expand_map")
            )
            meta.tile_rows = (maps["shrink_map"][1], maps["expand_map"][1])
        batch = ForwardBatch(
            input_ids=inputs[layout["ids"]],
            positions=inputs[layout["positions"]],
            slot_mapping=inputs[layout["slots"]],
            block_tables=i32(MAX_SEQS * self.max_blocks).view(MAX_SEQS, self.max_blocks),
            seq_lens=i32(MAX_SEQS),
            query_start_loc=i32(MAX_SEQS + 1),
            logits_indices=inputs[layout["logits"]],
            max_q_len=tokens,
            max_seq_len=self.max_blocks * self.block_size,
            lora=LoRAInputs(self.cache.pool.buffer.view(-1), meta, self.lora_backend),
            attn_tiles=i32(2 * maps["attn_map"][0]).view(-1, 2),
        )
        return _Static(tokens, maps, layout, batch, inputs, hosts)

    def _unpack(self, static: _Static) -> None:
        """Device-side: the int32 inputs from the int64 buffer (captured in the graph)."""
        batch, layout = static.batch, static.layout
        inputs = static.inputs
        batch.seq_lens.copy_(inputs[layout["seq_lens"]])
        batch.query_start_loc.copy_(inputs[layout["starts"]])
        batch.lora.meta.seg_start.copy_(inputs[layout["seg_start"]])
        batch.lora.meta.seg_slot.copy_(inputs[layout["seg_slot"]])
        batch.block_tables.view(-1).copy_(inputs[layout["tables"]])
        batch.attn_tiles.view(-1).copy_(inputs[layout["attn_map"]])
        if batch.lora.meta.tile_maps is not None:
            for name, t in zip(
                ("shrink_map", "expand_map"), batch.lora.meta.tile_maps, strict=True
            ):
                t.view(-1).copy_(inputs[layout[name]])

    def _fill(self, static: _Static, requests: list[Request], counts: list[int]) -> list[Request]:
        """Write the step's inputs into a pinned host buffer (numpy: no torch call on the
        engine thread) and copy it to the device; returns the requests that sample."""
        turn = static.turn
        static.turn ^= 1
        if static.copied[turn] is not None:
            static.copied[turn].synchronize()  # its last copy (two fills ago) has run
        host = static.hosts[turn].numpy()
        layout = static.layout
        bs, scratch = self.block_size, self.scratch_page
        ids, positions, slots = (host[layout[k]] for k in ("ids", "positions", "slots"))
        tables = host[layout["tables"]].reshape(MAX_SEQS, self.max_blocks)
        seq_lens, starts, logits = (host[layout[k]] for k in ("seq_lens", "starts", "logits"))
        seg_start, seg_slot = host[layout["seg_start"]], host[layout["seg_slot"]]
        # Padding first; the requests' entries overwrite their part.
        ids[:] = 0
        positions[:] = 0
        slots[:] = scratch * bs + np.arange(static.tokens) % bs
        tables[:] = scratch
        seq_lens[:] = 0
        logits[:] = 0
        seg_slot[:] = -1
        sampling: list[Request] = []
        at = 0
        segments = 0
        for i, (r, n) in enumerate(zip(requests, counts, strict=True)):
            start, end = r.num_computed_tokens, r.num_computed_tokens + n
            starts[i] = at
            ids[at : at + n] = r.tokens_slice(start, end)
            pos = np.arange(start, end)
            positions[at : at + n] = pos
            table = np.asarray(r.block_table, dtype=np.int64)
            slots[at : at + n] = table[pos // bs] * bs + pos % bs
            tables[i, : len(table)] = table
            seq_lens[i] = end
            slot = -1 if r.adapter_slot is None else r.adapter_slot
            if segments == 0 or seg_slot[segments - 1] != slot:
                seg_start[segments] = at
                seg_slot[segments] = slot
                segments += 1
            at += n
            if end == r.num_tokens:
                logits[len(sampling)] = at - 1
                sampling.append(r)
        starts[len(requests) :] = at
        seg_start[segments:] = at
        self._fill_maps(static, host, layout, counts, seg_start[: segments + 1], seg_slot)
        static.inputs.copy_(static.hosts[turn], non_blocking=True)
        if self.capture:
            static.copied[turn] = torch.cuda.Event()
            static.copied[turn].record()
        return sampling

    @staticmethod
    def _fill_maps(
        static: _Static,
        host: np.ndarray,
        layout: dict[str, slice],
        counts: list[int],
        seg_bounds: np.ndarray,
        seg_slot: np.ndarray,
    ) -> None:
        """The tile maps: (sequence, query block) for attention, (segment, row tile) of the
        segments with an adapter for the LoRA shrink and expand; -1 after the last."""
        seg_rows = np.diff(seg_bounds)
        seg_rows[seg_slot[: len(seg_rows)] < 0] = 0  # base-model rows: no LoRA work
        for name, (entries, rows) in static.maps.items():
            sizes = counts if name == "attn_map" else seg_rows
            tiles = -(-np.asarray(sizes, dtype=np.int64) // rows)
            owner = np.repeat(np.arange(len(tiles)), tiles)
            first = np.cumsum(tiles) - tiles
            block = np.arange(len(owner)) - np.repeat(first, tiles)
            out = host[layout[name]].reshape(entries, 2)
            out[:] = -1
            out[: len(owner), 0] = owner
            out[: len(owner), 1] = block
