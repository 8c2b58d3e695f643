"""Benchmark the batched multi-LoRA kernels on the GPU: decode and prefill, bf16, hidden 4096.

Adapters are packed as rows at scattered offsets of one flat pool, the way the page pool
holds them. Each case times ``lora_apply_triton`` for a one-target call (o_proj-like) and the
three-target q|k|v call, all widths 4096, with triton.testing.do_bench (median, launch
overhead included) and do_bench_cudagraph (median, device time). It reports microseconds and
achieved GB/s against the H200's measured 4.26 TB/s copy rate, where

    bytes = distinct adapter rows read + x read + y read and written

and times, in the same run, a naive torch baseline (gather each token's A and B^T into
padded [T, max_rank, width] tensors, then bmm) and the base layer's own GEMM for scale.

    python benchmarks/bench_lora.py --out bench_lora.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import triton
import triton.testing

from loraserve.kernels.lora import (
    GROUP_TILE_ROWS,
    LoRABatch,
    LoRATiles,
    _expand,
    _shrink,
    lora_apply,
    lora_apply_ref,
    lora_apply_triton,
    pick_tiles,
)

logger = logging.getLogger("bench_lora")

PEAK_BYTES_PER_S = 4.26e12  # measured H200 copy rate; the spec sheet says 4.8 TB/s
HIDDEN = 4096
CALLS = {  # name -> (first_target, out_slices); every target is 4096 -> 4096
    "o": (3, [(0, HIDDEN)]),
    "qkv": (0, [(0, HIDDEN), (HIDDEN, HIDDEN), (2 * HIDDEN, HIDDEN)]),
}


@dataclass
class Case:
    x: torch.Tensor  # [T, HIDDEN]
    y: torch.Tensor  # [T, out_total]
    weight: torch.Tensor  # [out_total, HIDDEN], the base layer
    pool: torch.Tensor  # [P] flat
    batch: LoRABatch
    first_target: int
    out_slices: list[tuple[int, int]]
    token_slot: torch.Tensor  # int64 [T] adapter slot of each token (for the baseline)
    num_distinct: int

    def args(self) -> tuple:
        return (self.x, self.y, self.pool, self.batch, 0, self.first_target, self.out_slices)


@dataclass
class Result:
    phase: str
    call: str
    tokens: int
    segments: int
    distinct: int
    rank: int
    tiles: str
    us: float
    us_graph: float
    gb_per_s: float  # from us (do_bench)
    gb_per_s_graph: float  # from us_graph (device time)
    bandwidth_util: float  # gb_per_s_graph over the copy rate
    naive_us: float
    base_gemm_us: float


def _row_offsets(num_slots: int, rank: int, g: torch.Generator, stride: int) -> torch.Tensor:
    """int64 [num_slots, LAYERS, 7, 2, rank]: rows ``stride`` elements apart, in random
    order."""
    num_rows = num_slots * LAYERS * 7 * 2 * rank
    perm = torch.randperm(num_rows, generator=g) * stride
    return perm.view(num_slots, LAYERS, 7, 2, rank).cuda()


# --pool-gb: spread the rows over a pool this large (the engine's pool shares ~118 GB with
# the KV cache), to see whether reads scattered that wide cost more (GPU TLB reach) than the
# same reads from a pool of just the adapters.
POOL_BYTES: int | None = None
# --layers (sweeps): each case's adapters in this many layers of rows of their own, and
# each timing one call per layer in turn (reported per call), so the adapters read between
# two reads of one row outgrow the H200's 50 MB L2 as in a decode step, where every layer's
# adapters come from HBM. 1 (session 16's sweeps and before): one layer, replayed, much of
# it L2-resident between replays; session 16's tensor-core fused kernel won such a sweep by
# 13% and lost in the engine.
LAYERS = 1


def make_case(
    seg_lens: list[int],
    num_distinct: int,
    rank: int,
    call: str,
    row_align: int = 8,
    sorted_slots: bool = False,
    rank_mix: tuple[int, ...] = (),
    rank_order: bool = False,
) -> Case:
    """Segment s uses slot s % num_distinct (``sorted_slots``: s * num_distinct // S, one
    adapter's segments side by side, as the engine orders decode rows); every target has
    rank ``rank`` (``rank_mix``: slot i rank_mix[i % len], each <= rank), scaling 0.5.
    ``rank_order``: the segments' slots in descending rank (largest programs first).

    Rows are HIDDEN apart (or spread over POOL_BYTES), offsets multiples of any row_align up
    to HIDDEN.
    """
    g = torch.Generator().manual_seed(0)
    first_target, out_slices = CALLS[call]
    num_slots = num_distinct
    num_rows = num_slots * LAYERS * 7 * 2 * rank
    stride = HIDDEN
    if POOL_BYTES is not None:  # bf16 elements per row slot, a multiple of HIDDEN
        stride = max(HIDDEN, POOL_BYTES // 2 // num_rows // HIDDEN * HIDDEN)
    row_offsets = _row_offsets(num_slots, rank, g, stride)
    pool = torch.empty(num_rows * stride, dtype=torch.bfloat16, device="cuda")
    if stride == HIDDEN:
        pool.normal_(0.0, 0.02)
    else:  # only the rows are read: fill them, leave the gaps
        rows = pool.view(num_rows, stride)[:, :HIDDEN]
        rows.normal_(0.0, 0.02)
    slots = torch.arange(len(seg_lens)) % num_distinct
    if sorted_slots:
        slots = torch.arange(len(seg_lens)) * num_distinct // len(seg_lens)
    if rank_order and rank_mix:
        by_rank = sorted(range(num_slots), key=lambda i: -rank_mix[i % len(rank_mix)])
        slots = torch.tensor(by_rank)[slots]
    starts = torch.tensor([0, *seg_lens]).cumsum(0)
    batch = LoRABatch(
        seg_start=starts.to(torch.int32).cuda(),
        seg_slot=slots.to(torch.int32).cuda(),
        row_offsets=row_offsets,
        ranks=_ranks(num_slots, rank, rank_mix),
        scalings=torch.full((num_slots, LAYERS, 7), 0.5, device="cuda"),
        max_rank=rank,
        max_seg_len=max(seg_lens),
        num_segments=len(seg_lens),
        row_align=row_align,
    )
    tokens = sum(seg_lens)
    out_total = sum(n for _, n in out_slices)
    return Case(
        x=torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device="cuda"),
        y=torch.randn(tokens, out_total, dtype=torch.bfloat16, device="cuda"),
        weight=torch.randn(out_total, HIDDEN, dtype=torch.bfloat16, device="cuda") * 0.02,
        pool=pool,
        batch=batch,
        first_target=first_target,
        out_slices=out_slices,
        token_slot=slots.repeat_interleave(torch.tensor(seg_lens)).cuda(),
        num_distinct=num_distinct,
    )


def _ranks(num_slots: int, rank: int, rank_mix: tuple[int, ...]) -> torch.Tensor:
    if not rank_mix:
        return torch.full((num_slots, LAYERS, 7), rank, dtype=torch.int32, device="cuda")
    per_slot = torch.tensor([rank_mix[i % len(rank_mix)] for i in range(num_slots)])
    ranks = per_slot.to(torch.int32)[:, None, None].expand(num_slots, LAYERS, 7)
    return ranks.contiguous().cuda()


def adapter_floor_us(case: Case) -> float:
    """Microseconds to read the distinct adapters' A rows once (the shrink's bytes; the
    expand's B^T rows are as many: every target here is HIDDEN wide) at the copy rate."""
    slots = case.batch.seg_slot.unique()
    t0, nt = case.first_target, len(case.out_slices)
    rows = int(case.batch.ranks[slots, 0, t0 : t0 + nt].sum())
    return rows * HIDDEN * case.x.element_size() / PEAK_BYTES_PER_S * 1e6


def group_rows(case: Case) -> Case:
    """The case's segments as a grouped decode batch (engine/graphs.py with group_lora):
    16-row tiles over a tile map padded to its worst case, with a live count (persistent
    grids)."""
    b = case.batch
    starts = b.seg_start.tolist()
    entries = [
        (s, m)
        for s in range(b.num_segments)
        for m in range(-(-(starts[s + 1] - starts[s]) // GROUP_TILE_ROWS))
    ]
    rows = case.x.shape[0]
    worst = rows + -(-rows // GROUP_TILE_ROWS)
    entries += [(-1, -1)] * (worst - len(entries))
    tile_map = torch.tensor(entries, dtype=torch.int32, device="cuda")
    b.tile_maps = (tile_map, tile_map)
    b.tile_rows = (GROUP_TILE_ROWS, GROUP_TILE_ROWS)
    b.tile_count = torch.tensor(
        [len(entries) - entries.count((-1, -1))], dtype=torch.int32, device="cuda"
    )
    b.grouped_rows = rows
    return case


def naive_apply(case: Case) -> None:
    """Baseline: gather every token's padded A and B^T from the pool, then two bmm."""
    b = case.batch
    cols = torch.arange(HIDDEN, device="cuda")
    j = torch.arange(b.max_rank, device="cuda")
    for k, (o, n) in enumerate(case.out_slices):
        t = case.first_target + k
        offs = b.row_offsets[case.token_slot, 0, t, :, : b.max_rank]  # [T, 2, R]
        live = (j[None, :] < b.ranks[case.token_slot, 0, t, None]).to(case.x.dtype)  # [T, R]
        a = case.pool[offs[:, 0, :, None] + cols]  # [T, R, HIDDEN]
        b_t = case.pool[offs[:, 1, :, None] + cols[:n]]  # [T, R, n]
        v = torch.bmm(a, case.x[:, :, None])[..., 0] * live  # [T, R]
        delta = torch.bmm(v[:, None, :], b_t)[:, 0]  # [T, n]
        scale = b.scalings[case.token_slot, 0, t, None]  # [T, 1]
        case.y[:, o : o + n] += (delta.float() * scale).to(case.y.dtype)


def traffic(case: Case) -> int:
    """Bytes one call must move: distinct adapter rows, x, and y read + written."""
    elem = case.x.element_size()
    n_targets = len(case.out_slices)
    adapter = case.num_distinct * n_targets * case.batch.max_rank * (HIDDEN + HIDDEN)
    tokens, out_total = case.y.shape
    return (adapter + tokens * HIDDEN + 2 * tokens * out_total) * elem


def _bench(fn: Callable[[], object]) -> tuple[float, float]:
    """(median ms with launches, median ms of graph replays)."""
    ms = triton.testing.do_bench(fn, return_mode="median")
    ms_graph = triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return ms, ms_graph


def time_case(case: Case, phase: str, call: str) -> Result:
    tiles = pick_tiles(
        case.batch,
        HIDDEN,
        len(case.out_slices),
        HIDDEN,
        torch.cuda.get_device_properties(0).multi_processor_count,
    )
    ms, ms_graph = _bench(lambda: lora_apply(*case.args(), backend="triton"))
    naive_ms = triton.testing.do_bench_cudagraph(lambda: naive_apply(case), return_mode="median")
    base_ms = triton.testing.do_bench(lambda: case.x @ case.weight.T, return_mode="median")
    gb_per_s_graph = traffic(case) / (ms_graph * 1e-3) / 1e9
    return Result(
        phase=phase,
        call=call,
        tokens=case.x.shape[0],
        segments=case.batch.num_segments,
        distinct=case.num_distinct,
        rank=case.batch.max_rank,
        tiles=str(tuple(tiles)),
        us=ms * 1e3,
        us_graph=ms_graph * 1e3,
        gb_per_s=traffic(case) / (ms * 1e-3) / 1e9,
        gb_per_s_graph=gb_per_s_graph,
        bandwidth_util=gb_per_s_graph * 1e9 / PEAK_BYTES_PER_S,
        naive_us=naive_ms * 1e3,
        base_gemm_us=base_ms * 1e3,
    )


def max_error(seg_lens: list[int], rank: int) -> dict[str, float]:
    """Kernel vs reference on bf16 q|k|v: max abs error, the largest delta for scale, and
    the fraction of outputs that differ (by a rounding step of y)."""
    case = make_case(seg_lens, min(8, len(seg_lens)), rank, "qkv")
    y0 = case.y.clone()
    lora_apply_triton(*case.args())
    got = case.y.float()
    case.y.copy_(y0)
    lora_apply_ref(*case.args())
    want = case.y.float()
    return {
        "max_abs": (got - want).abs().max().item(),
        "max_abs_delta": (want - y0.float()).abs().max().item(),
        "frac_differ": (got != want).float().mean().item(),
    }


def check_naive(seg_lens: list[int], rank: int) -> float:
    """The baseline computes the same thing: max abs difference vs the reference."""
    case = make_case(seg_lens, 8, rank, "qkv")
    y0 = case.y.clone()
    naive_apply(case)
    got = case.y.float()
    case.y.copy_(y0)
    lora_apply_ref(*case.args())
    return (got - case.y.float()).abs().max().item()


# --sweep: one block size changed at a time from pick_tiles' choice, shrink and expand timed
# apart (graph replays), to tune pick_tiles
S2_GROUPS = [5] * 48 + [4] * 4  # S2 at saturation: 256 decode rows of ~52 distinct adapters
SWEEP_CASES = [  # (phase, segment lengths, distinct adapters, rank, call)
    ("decode", [1] * 256, 256, 64, "qkv"),
    ("decode", [1] * 256, 52, 64, "qkv"),  # S2 at saturation: ~52 distinct adapters
    ("decode", [1] * 256, 52, 64, "o"),
    ("sorted", [1] * 256, 52, 64, "qkv"),  # the same rows side by side by adapter
    ("sorted", [1] * 256, 52, 64, "o"),
    ("gdecode", S2_GROUPS, 52, 64, "qkv"),  # the same rows grouped (the decode graphs)
    ("gdecode", S2_GROUPS, 52, 64, "o"),
    ("gdecode", [1] * 32, 32, 16, "o"),
    ("gdecode", [4] * 64, 64, 16, "qkv"),
    # S2 n=2000 as session 7 measured it: ~152 distinct adapters over ~158 rows, ranks 8-64
    ("mixed", [1] * 160, 152, 64, "qkv"),
    ("mixed", [1] * 160, 152, 64, "o"),
    # the same rows ordered by rank, largest first: does the order of programs matter?
    ("mixed_ranksort", [1] * 160, 152, 64, "qkv"),
    ("mixed_ranksort", [1] * 160, 152, 64, "o"),
    ("decode", [1] * 32, 32, 16, "o"),
    ("decode", [1], 1, 16, "qkv"),
    # S1 n=2000 at saturation (rank 8, ~240 rows of nearly as many adapters): the decode
    # probe measured LoRA's extra step time at 1.85x its bytes there (session 11); and rank 32
    ("s1", [1] * 240, 230, 8, "qkv"),
    ("s1", [1] * 240, 230, 8, "o"),
    ("decode", [1] * 240, 200, 32, "qkv"),
    # small batches (R = 10 in S-LoRA's table: ~15-30 rows), where the launches' fixed
    # costs dominate
    ("small", [1] * 16, 16, 8, "qkv"),
    ("small", [1] * 16, 16, 8, "o"),
    ("small", [1] * 16, 16, 64, "qkv"),
    ("small", [1] * 32, 32, 16, "qkv"),
    ("prefill", [512] * 4, 4, 16, "qkv"),
    ("prefill", [512] * 4, 4, 64, "qkv"),
    ("grouped", [32] * 8, 8, 16, "qkv"),
    # S-LoRA's table at small n (S4 n=5: ~29 decode rows on 5 adapters of ranks 64/32/16/8,
    # grouped): LoRA added 1.44 ms a step for 0.16 ms of bytes, the kernels' latency
    ("gsmall", [6, 6, 6, 6, 5], 5, 64, "qkv"),
    ("gsmall", [6, 6, 6, 6, 5], 5, 64, "o"),
    # S1 n=2000's prompt steps: 5 prompts of 430 tokens, one rank-8 adapter each. Session 12
    # timed the prefill expand there at 31 us a call, ~1.9x its output's read and write
    ("s1prefill", [430] * 5, 5, 8, "qkv"),
    ("s1prefill", [430] * 5, 5, 8, "o"),
]
DECODE_KNOBS = {
    "block_c": [16, 32, 64],
    "block_k": [128, 512],  # bytes in flight per K step: 16 x 512 is session 7's 32 x 256
    "split_k": [1, 4, 16],
    "shrink_warps": [2, 4, 8],
    "block_r": [16, 32, 64],
    "block_n": [64, 128, 256, 512],
    "expand_warps": [2, 4, 8],
    "n_group": [1, 2, 4, 8, 16, 32],
    "dense": [1],
    "rank_pack": [1],
    "shrink_stages": [2, 3, 4],  # the shrink's K loop pipelined (tl.range(num_stages=))
}
# knob pairs tried on top of DECODE_KNOBS for the mixed-rank case: wider expand N tiles with
# fewer rank rows (the B^T tile of a small rank is tiny), dense shrink columns with wider tiles
MIXED_COMBOS = [
    dict(block_r=16, block_n=256),
    dict(block_r=16, block_n=512),
    dict(block_r=32, block_n=256),
    dict(dense=1, block_c=16),
    dict(dense=1, block_c=64),
    dict(dense=1, split_k=2),
    dict(dense=1, split_k=4),
    # small ranks' B^T rows of several output tiles per load, with more tiles per program
    dict(rank_pack=1, n_group=16),
    dict(rank_pack=1, n_group=32),
    dict(rank_pack=1, block_c=16, dense=1),
    dict(rank_pack=1, expand_warps=4),
    dict(rank_pack=1, block_n=256, expand_warps=4),
    # the shrink's K split counts every column tile, live or not: with mixed ranks most are
    # dead (rank 8 of r_pad 64), so the live programs may want more splits than it gives
    dict(split_k=2),
    dict(split_k=2, block_k=256),  # session 9's best mixed q|k|v shrink
    dict(block_n=128, n_group=4),  # the expand before session 9
    dict(block_n=128, n_group=8),
    # wider expand tiles over more warps (512 columns at 2 warps won session 9's sweep)
    dict(block_n=1024, expand_warps=4),
    dict(block_n=1024, expand_warps=8),
    dict(block_n=512, expand_warps=4, n_group=2),
    dict(split_k=2, dense=1),
    dict(split_k=4, dense=1, block_c=32),
]
GROUPED_KNOBS = {
    "split_k": [1, 2, 4, 8, 16],
    "shrink_stages": [2, 3],  # the K loop pipelined: few programs, each a long serial loop
    "block_c": [64, 256],
    "block_k": [32, 128],
    "shrink_warps": [2, 8],
    "block_r": [16, 64],
    "block_n": [64, 256],
    "expand_warps": [2, 8],
}
# S1's prompt steps (5 x 430 rows, rank 8): larger expand tiles than one knob at a time gives
PREFILL_COMBOS = [
    dict(expand_block_m=32, block_n=256),
    dict(expand_block_m=64, block_n=256),
    dict(expand_block_m=64, block_n=256, expand_warps=8),
    dict(expand_block_m=64, block_n=128, expand_warps=8),
    dict(expand_block_m=32, block_n=256, expand_warps=8),
    dict(expand_block_m=32, block_n=128, expand_warps=8),
    dict(block_m=128, split_k=1),
    dict(block_m=128, split_k=2),
]
PREFILL_KNOBS = {
    "shrink_stages": [2, 3],
    "block_m": [32, 64, 128],
    "split_k": [1, 2, 4, 8],
    "block_r": [16, 32, 64],
    "block_n": [64, 128, 256],
    "expand_warps": [2, 8],
    "expand_block_m": [16, 32, 64],
}


def _variants(
    default: LoRATiles, knobs: dict[str, list[int]], rank: int, combos: list[dict] | None = None
) -> list[LoRATiles]:
    changes = [{knob: value} for knob, values in knobs.items() for value in values]
    out = [default]
    r_pad = max(16, triton.next_power_of_2(rank))
    for change in [*changes, *(combos or [])]:
        tiles = default._replace(**change)
        if tiles not in out and tiles.block_r <= r_pad and tiles.expand_m <= 64:
            out.append(tiles)
    return out


def _time_variant(case: Case, tiles: LoRATiles) -> tuple[float, float]:
    """(shrink us, expand us) of one call with the given tiles, graph replays (a call per
    layer in turn, LAYERS)."""
    x, pool, b, t0, nt = case.x, case.pool, case.batch, case.first_target, len(case.out_slices)
    v = _shrink(x, pool, b, 0, t0, nt, tiles)

    def shrinks() -> None:
        for layer in range(LAYERS):
            _shrink(x, pool, b, layer, t0, nt, tiles)

    def expands() -> None:  # (v of layer 0 for every layer: the values do not matter)
        for layer in range(LAYERS):
            _expand(case.y, v, pool, b, layer, t0, case.out_slices, tiles)

    shrink_ms = triton.testing.do_bench_cudagraph(shrinks, return_mode="median")
    expand_ms = triton.testing.do_bench_cudagraph(expands, return_mode="median")
    return shrink_ms * 1e3 / LAYERS, expand_ms * 1e3 / LAYERS


def sweep(args: argparse.Namespace, save=lambda rows: None) -> list[dict]:
    """Every tile variant of every case; ``save(rows)`` after each case, so a run cut short
    by a time limit still leaves the cases it finished."""
    rows = []
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for phase, seg_lens, distinct, rank, call in SWEEP_CASES:
        if args.phases and phase not in args.phases:
            continue
        mixed = phase.startswith("mixed")
        grouped = phase in ("gdecode", "gsmall")
        sort = phase == "sorted" or grouped or mixed
        mix = (8, 16, 32, 64) if mixed or phase == "gsmall" else ()
        case = make_case(
            seg_lens, distinct, rank, call, args.row_align, sort, mix, phase == "mixed_ranksort"
        )
        floor_us = adapter_floor_us(case)
        if grouped:
            group_rows(case)
        default = pick_tiles(case.batch, HIDDEN, len(case.out_slices), HIDDEN, num_sms)
        knobs = DECODE_KNOBS if default.block_m == 1 else PREFILL_KNOBS
        if grouped:
            knobs = GROUPED_KNOBS
        combos = MIXED_COMBOS if phase == "mixed" else []
        if phase == "s1prefill":
            combos = PREFILL_COMBOS
        for tiles in _variants(default, knobs, rank, combos):
            try:
                shrink_us, expand_us = _time_variant(case, tiles)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run
                logger.warning("%s %s %s: %s", phase, call, tuple(tiles), e)
                shrink_us = expand_us = float("nan")
            rows.append(
                dict(phase=phase, call=call, rank=rank, tokens=sum(seg_lens), distinct=distinct,
                     default=tiles == default, tiles=tuple(tiles),
                     shrink_us=shrink_us, expand_us=expand_us, a_bytes_us=floor_us)
            )  # fmt: skip
            logger.info("%s", rows[-1])
        del case
        save(rows)
    if not args.phases or "rank_classes" in args.phases:
        rows += rank_classes(args, num_sms)
    if not args.phases or "fused" in args.phases:
        rows += fused_decode(args, num_sms, save=lambda more: save(rows + more))
    return rows


# --sweep's fused phase: decode LoRA in one launch (LoRATiles.fused) against the two
# launches, each timed as one graph of the whole call (apply_us), at S1 n = 2000's
# saturated decode batch (~195 rows on ~184 rank-8 adapters) and around it
FUSED_CASES = [  # (segments, distinct adapters, rank, rank mix, call)
    (195, 184, 8, (), "qkv"),
    (195, 184, 8, (), "o"),
    (64, 64, 8, (), "qkv"),
    (64, 64, 8, (), "o"),
    (16, 16, 8, (), "qkv"),
    (195, 184, 16, (), "qkv"),
    (195, 184, 16, (), "o"),
    (224, 224, 64, (8, 16, 32, 64), "qkv"),  # S2 n = 2000's: mixed ranks
    (224, 224, 64, (8, 16, 32, 64), "o"),
]
FUSED_KNOBS = {
    "fused": [1, 2, 3, 4, 8],  # programs per (row, target)
    "shrink_warps": [2, 4, 8],
    "shrink_stages": [0, 2, 3, 4],
    "block_k": [256, 512, 1024],
    "block_n": [128, 256, 512, 1024],
}


def _time_apply(case: Case, tiles: LoRATiles) -> float:
    """Device us of one whole lora_apply_triton call (graph replays, a call per layer in
    turn: LAYERS)."""
    head, tail = case.args()[:4], case.args()[5:]

    def calls() -> None:
        for layer in range(LAYERS):
            lora_apply_triton(*head, layer, *tail, tiles=tiles)

    ms = triton.testing.do_bench_cudagraph(calls, return_mode="median")
    return ms * 1e3 / LAYERS


def fused_decode(args: argparse.Namespace, num_sms: int, save=lambda rows: None) -> list[dict]:
    rows = []
    for segments, distinct, rank, mix, call in FUSED_CASES:
        case = make_case([1] * segments, distinct, rank, call, args.row_align, True, mix)
        floor_us = adapter_floor_us(case)
        shape = (HIDDEN, len(case.out_slices), HIDDEN, num_sms)
        two = pick_tiles(case.batch, *shape)
        case.batch.fused_decode = True
        one = pick_tiles(case.batch, *shape)
        variants = [two, *_variants(one, FUSED_KNOBS, rank)]
        for tiles in variants:
            try:
                shrink_us, expand_us = (0.0, 0.0) if tiles.fused else _time_variant(case, tiles)
                apply_us = _time_apply(case, tiles)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run
                logger.warning("fused %s %s: %s", call, tuple(tiles), e)
                shrink_us = expand_us = apply_us = float("nan")
            if tiles.fused:  # one launch: all of it counts as the expand
                expand_us = apply_us
            rows.append(
                dict(phase="fused", call=call, rank=rank, tokens=segments, distinct=distinct,
                     mix=mix, default=tiles in (two, one), tiles=tuple(tiles),
                     shrink_us=shrink_us, expand_us=expand_us, apply_us=apply_us,
                     a_bytes_us=floor_us)
            )  # fmt: skip
            logger.info("%s", rows[-1])
        del case
        save(rows)
    return rows


def rank_classes(args: argparse.Namespace, num_sms: int) -> list[dict]:
    """The mixed-rank case (160 rows, 152 adapters, ranks 8-64) as one launch per rank class,
    each with the tiles pick_tiles gives its own rank (a rank-8 class: 16 rank rows per
    expand step and wide N tiles, not 64 mostly masked ones): the time per-class launches
    would take, summed over the classes, beside the one-launch "mixed" rows."""
    rows = []
    for call in ("qkv", "o"):
        shrink = expand = floor = 0.0
        tiles = []
        for rank in (8, 16, 32, 64):
            case = make_case([1] * 40, 38, rank, call, args.row_align, sorted_slots=True)
            t = pick_tiles(case.batch, HIDDEN, len(case.out_slices), HIDDEN, num_sms)
            s_us, e_us = _time_variant(case, t)
            shrink, expand, floor = shrink + s_us, expand + e_us, floor + adapter_floor_us(case)
            tiles.append(tuple(t))
            del case
        rows.append(
            dict(phase="rank_classes", call=call, rank=64, tokens=160, distinct=152,
                 default=True, tiles=tuple(tiles), shrink_us=shrink, expand_us=expand,
                 a_bytes_us=floor)
        )  # fmt: skip
        logger.info("%s", rows[-1])
    return rows


def host_overhead(args: argparse.Namespace) -> dict[str, float]:
    """Host microseconds per call: the whole call, and the Python before the launches."""
    case = make_case([1] * 32, 32, 16, "qkv", args.row_align)
    tiles = pick_tiles(case.batch, HIDDEN, 3, HIDDEN, 132)
    out = {}
    for name, fn in {
        "lora_apply": lambda: lora_apply(*case.args(), backend="triton"),
        "pick_tiles": lambda: pick_tiles(case.batch, HIDDEN, 3, HIDDEN, 132),
        "shrink_launch": lambda: _shrink(case.x, case.pool, case.batch, 0, 0, 3, tiles),
    }.items():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - start) / 200 * 1e6
    return out


def cases(args: argparse.Namespace) -> list[tuple[str, list[int], int]]:
    """(phase, segment lengths, distinct adapters) of every batch to time."""
    out = []
    for bs in args.batches:
        for distinct in sorted({bs, min(bs, 8)}, reverse=True):
            out.append(("decode", [1] * bs, distinct))
    prefill = [args.prefill_len] * args.prefill_batch
    out.append(("prefill", prefill, args.prefill_batch))
    for bs in args.batches:
        if bs >= 16:  # same-adapter requests grouped into one segment each (8 adapters)
            out.append(("grouped", [bs // 8] * 8, 8))
    return out


def run(args: argparse.Namespace) -> dict:
    results: list[Result] = []
    for rank in args.ranks:
        for phase, seg_lens, distinct in cases(args):
            for call in CALLS:
                case = make_case(seg_lens, distinct, rank, call, args.row_align)
                results.append(time_case(case, phase, call))
                logger.info("%s", results[-1])
                del case
    errors = {
        "decode_bs32_r16": max_error([1] * 32, 16),
        "prefill_4x200_r64": max_error([200] * 4, 64),
    }
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "hidden": HIDDEN,
        "dtype": "bfloat16",
        "row_align": args.row_align,
        "peak_gb_per_s": PEAK_BYTES_PER_S / 1e9,
        "error_vs_ref": errors,
        "naive_max_abs_diff_vs_ref": check_naive([1] * 16, 16),
        "results": [asdict(r) for r in results],
    }


def print_table(report: dict) -> None:
    print(
        f"{'phase':8}{'call':5}{'tok':>6}{'dist':>5}{'rank':>5}{'us':>8}{'GB/s':>7}{'us_gr':>8}"
        f"{'GB/s':>7}{'%BW':>5}{'naive':>9}{'x':>6}{'gemm':>8}  tiles"
    )
    for r in report["results"]:
        print(
            f"{r['phase']:8}{r['call']:5}{r['tokens']:>6}{r['distinct']:>5}{r['rank']:>5}"
            f"{r['us']:>8.1f}{r['gb_per_s']:>7.0f}{r['us_graph']:>8.1f}{r['gb_per_s_graph']:>7.0f}"
            f"{100 * r['bandwidth_util']:>4.0f}%{r['naive_us']:>9.1f}"
            f"{r['naive_us'] / r['us_graph']:>6.1f}{r['base_gemm_us']:>8.1f}  {r['tiles']}"
        )
    print(f"error vs reference: {report['error_vs_ref']}")
    print(f"naive baseline max abs diff vs reference: {report['naive_max_abs_diff_vs_ref']}")


def print_sweep(report: dict) -> None:
    print(f"host us per call: {report['host_us']}")
    print(f"{'phase':8}{'call':5}{'rank':>5}{'shrink':>8}{'expand':>8}{'A=B us':>8}  tiles")
    for r in report["sweep"]:
        mark = "*" if r["default"] else " "
        print(
            f"{r['phase']:8}{r['call']:5}{r['rank']:>5}{r['shrink_us']:>8.1f}"
            f"{r['expand_us']:>8.1f}{r.get('a_bytes_us', 0):>8.1f} {mark}{r['tiles']}"
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench_lora.json", help="where to write the JSON report")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--row-align", type=int, default=8, help="LoRABatch.row_align (elements)")
    p.add_argument("--sweep", action="store_true", help="time block-size variants instead")
    p.add_argument(
        "--phases",
        type=lambda s: set(s.split(",")),
        default=None,
        help="with --sweep: only these phases of its cases (comma list, e.g. small,s1; "
        "rank_classes for the per-rank-class rows); default all",
    )
    p.add_argument(
        "--pool-gb", type=float, default=None, help="spread adapter rows over a pool this large"
    )
    p.add_argument(
        "--layers",
        type=int,
        default=1,
        help="with --sweep: each case's adapters in this many layers, each timing a call per "
        "layer in turn (more adapter bytes than L2 holds, as in a decode step); default 1",
    )
    return p.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora needs a CUDA GPU")
    global POOL_BYTES, LAYERS
    POOL_BYTES = None if args.pool_gb is None else int(args.pool_gb * 2**30)
    LAYERS = args.layers
    if args.sweep:
        host_us = host_overhead(args)

        def save(rows: list[dict]) -> None:
            with open(args.out, "w") as f:
                json.dump({"host_us": host_us, "sweep": rows, "partial": True}, f, indent=2)

        report = {"host_us": host_us, "sweep": sweep(args, save)}
        print_sweep(report)
    else:
        report = run(args)
        print_table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
