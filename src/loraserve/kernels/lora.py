"""Batched multi-LoRA: add every token's own adapter delta to a packed linear layer's output.

Adapter weights live in the shared page pool (S-LoRA's unified paging), packed as rows that
are each contiguous in the pool viewed flat. For one (adapter slot, layer, target) of rank r:

    pool (flat)  ...| A row 3 (in wide) |....| B^T row 0 (out wide) |...| A row 0 |...
    row_offsets[slot, layer, target, 0, j] = offset of A row j    (PEFT lora_A.weight[j])
    row_offsets[slot, layer, target, 1, j] = offset of B^T row j  (PEFT lora_B.weight[:, j])

Rows sit anywhere, in any order, in any page. Token rows of x/y are grouped into segments
(one request's run of rows this step); segment s owns rows seg_start[s] : seg_start[s + 1].
Rows before seg_start[0] and from seg_start[S] on belong to no segment: they cost nothing.
A base-only run between two LoRA segments is a segment of slot -1: never read or written,
its programs exit at once.

    x/y rows   | base | seg 0 (slot 5) | seg 1 (-1) | seg 2 (slot 2) | seg 3 (slot 5) | base |
    seg_start         2                5            7                9                10

One call serves one packed linear layer whose targets share x (q|k|v, gate|up, or a single
o / down). It runs in two launches, with an fp32 scratch between them:

    shrink:  v[tok, t * R_PAD + j] = x[tok] . A_t[j]                 all targets, x read once
    expand:  y[tok, o_t : o_t + n_t] += scaling_t * sum_j v[tok, t * R_PAD + j] * B^T_t[j]

R_PAD = next power of two >= max(16, max_rank). Shrink columns are (target, rank row) pairs;
a column past its target's rank is masked (never loaded, never stored, never read back).
The shrink may split the input features over ``split_k`` programs; each writes its own
partial sum into v [split_k, T, n_targets * R_PAD] and the expand adds the partials.

Decode batches of ranks <= 16 (``LoRABatch.fused_decode``, up to ``fused_max_rank``; the
engine's default) run both in one launch instead: a program per (token, target) computes v
in registers over the whole of K and then expands it (``_fused_decode_kernel``); at such
ranks the boundary between two launches costs about as much as either kernel. Each program
takes the tile shape of its own rank's class (8, 16, ... rank rows; ``fused_rank_classes``).
The engine's decode graphs give a step this form whenever its adapters' ranks allow,
whatever the page tables' width (engine/graphs.py, ``DecodeGraphs.small_rank``).

Two kernel forms, picked by ``max_seg_len`` (Punica's BGMV/SGMV, S-LoRA's MBGMV/MBGMM):
decode (every segment one token) uses matrix-vector programs without tl.dot; prefill tiles
each segment's rows by BLOCK_M and uses tl.dot (every operand dimension >= 16). Both
accumulate in fp32 and add to y in fp32 before storing in y's dtype. Triton's CPU
interpreter gets bf16 wrong, so on the CPU the kernels are tested in fp32 and fp16.

A decode batch whose rows are grouped by adapter (``grouped_rows``: the decode graphs'
grouped form) runs the prefill form in 16-row tiles over a tile map; with ``tile_count``
(the map's live entries, on the device) the grids are persistent: a fixed number of
programs strides over the live entries, so a CUDA graph sized for the worst case does not
launch a program per possible tile.

``lora_apply_bmm`` is S-LoRA's "padded" ablation, for benchmarks: each token row gathers its
adapter's rows padded to the batch's max rank and two torch.bmm compute the delta.

The Triton path reads no device value on the host (block sizes come from the host ints of
LoRABatch), so it can be captured in a CUDA graph. ``LoRABatch.row_align`` promises that
every row offset is a multiple of that many elements; 8 (16 bytes of bf16) lets the
kernels use 16-byte loads of A and B^T rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from loraserve.config import LORA_TARGETS
from loraserve.kernels.host import cdiv, next_power_of_2
from loraserve.kernels.tile_map import program_entries, tile_entry

NUM_TARGETS = len(LORA_TARGETS)
MAX_CALL_TARGETS = 3  # targets one call may cover (q|k|v is the widest packing)
# Int arguments that change from call to call (layer, target, K split): not specialised on
# (value 1, divisibility by 16), so a new layer or batch shape never compiles a new variant
# in the middle of serving. warm_up_lora_kernels compiles the rest at start-up.
_RUNTIME_INTS = ("layer", "first_target", "k_blocks", "split_k", "n_tiles", "n_group")
_DECODE_MAX_SPLIT_K = 32
# Decode-form expand grid: fewer, longer programs down to this many per SM, with at most
# _EXPAND_MAX_N_GROUP output tiles each. Session 9's second sweep, 512-column tiles: with
# ranks above 16, 1-2 tiles per program (16 programs per SM and more) were best, within
# 1 us of each other (mixed ranks q|k|v 40.5 us with 2 against 42.4 with 8, o 13.9 with 1
# against 15.6 with 4; rank 32 48.3 against 49.8). Ranks <= 16 pack the B^T rows of
# several tiles into one load (rank_pack), which needs several tiles per program: there 8
# for q|k|v and 4 for o (2 programs per SM) were measured (rank 8 over 240 rows: q|k|v
# 13.0 us against 32.0 unpacked, o 4.6 against 7.6).
_EXPAND_PROGRAMS_PER_SM = 16
_EXPAND_PROGRAMS_PER_SM_PACKED = 2
_EXPAND_MAX_N_GROUP = 8
_DECODE_BLOCK_N = 512
# Fused decode (LoRATiles.fused): up to this max rank (LoRABatch.fused_max_rank's default)
FUSED_MAX_RANK = 16
_PERSISTENT_PROGRAMS_PER_SM = 8  # persistent grids (LoRABatch.tile_count): programs per SM
GROUP_TILE_ROWS = 16  # rows per tile of a grouped decode batch (LoRABatch.grouped_rows)


@dataclass
class LoRABatch:
    """Per-step LoRA metadata, built once by the engine and shared by every layer."""

    seg_start: Tensor  # int32 [S + 1] token-row offsets of the segments (sorted, disjoint)
    seg_slot: Tensor  # int32 [S] adapter slot of each segment; -1 = base-only rows
    row_offsets: Tensor  # int64 [num_slots, num_layers, 7, 2 (A | B^T), table_rank]
    ranks: Tensor  # int32 [num_slots, num_layers, 7]; 0 = (layer, target) not adapted
    scalings: Tensor  # float32 [num_slots, num_layers, 7]
    max_rank: int  # >= every rank in the tables (host int, no sync)
    max_seg_len: int  # longest segment of slot >= 0 (host int); 1 = decode
    num_segments: int
    row_align: int = 1  # every row offset is a multiple of this (elements): wide loads
    # Prefill form, optional: the (segment, row tile) pairs that have rows, int32 [M, 2],
    # padded with segment -1, for the shrink (tiles of tile_rows[0] rows) and the expand
    # (tile_rows[1]). The grids then run over these instead of segments x the longest
    # segment's tiles (padded CUDA graphs size those for the worst case).
    tile_maps: tuple[Tensor, Tensor] | None = None
    tile_rows: tuple[int, int] = (0, 0)
    # With tile maps, optional: int32 [1], how many entries at the front of each map have
    # rows. The kernels then launch a fixed grid whose programs stride over those entries
    # (persistent), instead of one program per map entry, live or not.
    tile_count: Tensor | None = None
    # A decode batch of this many rows grouped into segments by adapter (the decode graphs'
    # sorted rows, engine/graphs.py): prefill-form tiles of 16 rows, so each segment reads
    # its adapter once however many rows use it. 0 = not grouped.
    grouped_rows: int = 0
    # Decode form: the expand reads several output tiles' B^T rows of a small rank in one
    # load (LoRATiles.rank_pack).
    rank_pack: bool = False
    # Decode form with max_rank <= fused_max_rank: shrink and expand in one launch
    # (_fused_decode_kernel), a program per (row, target) that keeps its v in registers.
    # Small ranks only: there the boundary between two launches costs about as much as
    # either kernel; at rank 64 (S2's mixed ranks) the fused programs ran 1.5-1.8x slower.
    fused_decode: bool = False
    fused_max_rank: int = FUSED_MAX_RANK  # ... up to this max_rank (the engine's option)

    def __post_init__(self) -> None:
        num_slots, num_layers = self.ranks.shape[:2]
        _expect(self.seg_start, torch.int32, (self.num_segments + 1,), "seg_start")
        _expect(self.seg_slot, torch.int32, (self.num_segments,), "seg_slot")
        _expect(self.ranks, torch.int32, (num_slots, num_layers, NUM_TARGETS), "ranks")
        _expect(self.scalings, torch.float32, tuple(self.ranks.shape), "scalings")
        table_rank = self.row_offsets.shape[-1]
        shape = (num_slots, num_layers, NUM_TARGETS, 2, table_rank)
        _expect(self.row_offsets, torch.int64, shape, "row_offsets")
        if self.max_rank > table_rank:
            raise ValueError(f"max_rank={self.max_rank} exceeds row_offsets' {table_rank} rows")
        if self.row_align < 1 or self.row_align & (self.row_align - 1):
            raise ValueError(f"row_align={self.row_align} must be a power of two")
        if self.num_segments > 0 and (self.max_rank < 1 or self.max_seg_len < 1):
            raise ValueError("a batch with segments needs max_rank >= 1 and max_seg_len >= 1")
        if self.tile_count is not None and self.tile_maps is None:
            raise ValueError("tile_count counts tile map entries: it needs tile_maps")

    @property
    def num_layers(self) -> int:
        return self.ranks.shape[1]


def _expect(t: Tensor, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(
            f"LoRABatch.{name}: want contiguous {dtype} {shape}, got {t.dtype} {tuple(t.shape)}"
        )


def _check_call(
    x: Tensor, y: Tensor, pool: Tensor, first_target: int, out_slices: Sequence[tuple[int, int]]
) -> None:
    _check_inputs(x, pool, first_target, out_slices)
    _check_output(x, y, out_slices)


def _check_inputs(
    x: Tensor, pool: Tensor, first_target: int, out_slices: Sequence[tuple[int, int]]
) -> None:
    if not 1 <= len(out_slices) <= MAX_CALL_TARGETS:
        raise ValueError(f"a call covers 1..{MAX_CALL_TARGETS} targets, got {len(out_slices)}")
    if first_target < 0 or first_target + len(out_slices) > NUM_TARGETS:
        raise ValueError(f"targets {first_target}..+{len(out_slices)} outside {LORA_TARGETS}")
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, in_features], got {tuple(x.shape)}")
    if pool.dim() != 1 or x.dtype != pool.dtype:
        raise ValueError(f"pool must be flat and of x's dtype {x.dtype}, got {pool.dtype}")


def _check_output(x: Tensor, y: Tensor, out_slices: Sequence[tuple[int, int]]) -> None:
    if y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} need the same rows")
    for o, n in out_slices:
        if o < 0 or n < 1 or o + n > y.shape[1]:
            raise ValueError(f"out slice ({o}, {n}) outside y's {y.shape[1]} columns")


def _gather_rows(pool: Tensor, offsets: Tensor, width: int) -> Tensor:
    """Rows starting at the given flat offsets. offsets: int64 [n] -> [n, width]."""
    cols = torch.arange(width, device=pool.device)
    return pool[offsets[:, None] + cols[None, :]]


def _rows_by_slot(batch: LoRABatch, device: torch.device) -> dict[int, Tensor]:
    """slot -> int64 token rows of all its segments, base-only ones left out (syncs)."""
    starts = batch.seg_start.tolist()
    spans: dict[int, list[Tensor]] = {}
    for s, slot in enumerate(batch.seg_slot.tolist()):
        if slot < 0:
            continue
        spans.setdefault(slot, []).append(torch.arange(starts[s], starts[s + 1], device=device))
    return {slot: torch.cat(parts) for slot, parts in spans.items()}


def lora_apply_ref(
    x: Tensor,  # [T, in_features]
    y: Tensor,  # [T, out_total], updated in place (may be a strided view)
    pool: Tensor,  # [P] the page pool viewed flat
    batch: LoRABatch,
    layer: int,
    first_target: int,
    out_slices: Sequence[tuple[int, int]],  # per target (output column offset, width)
) -> None:
    """Plain torch, fp32 inside: one pair of matmuls per (slot, target)."""
    if batch.num_segments == 0:
        return
    _check_call(x, y, pool, first_target, out_slices)
    for slot, rows in _rows_by_slot(batch, x.device).items():
        xs = x[rows].float()  # [n, in_features]
        for k, (o, n) in enumerate(out_slices):
            t = first_target + k
            rank = int(batch.ranks[slot, layer, t])
            if rank == 0:
                continue
            offs = batch.row_offsets[slot, layer, t, :, :rank]  # [2, rank]
            a = _gather_rows(pool, offs[0], x.shape[1]).float()  # [rank, in_features]
            b_t = _gather_rows(pool, offs[1], n).float()  # [rank, n]
            delta = (xs @ a.T) @ b_t * batch.scalings[slot, layer, t]  # [n_rows, n]
            y[rows, o : o + n] = (y[rows, o : o + n].float() + delta).to(y.dtype)


# Gathered rows per lora_apply_bmm chunk (tokens x max_rank x width): bounds its scratch.
_BMM_CHUNK_ELEMS = 1 << 24


def _token_slots(batch: LoRABatch, num_rows: int, device: torch.device) -> Tensor:
    """int64 [T]: each token row's adapter slot; -1 outside every segment (no sync)."""
    rows = torch.arange(num_rows, dtype=torch.int32, device=device)
    seg = torch.searchsorted(batch.seg_start, rows, right=True) - 1  # [T]
    inside = (seg >= 0) & (seg < batch.num_segments)
    slots = batch.seg_slot[seg.clamp(0, batch.num_segments - 1)].long()
    return torch.where(inside, slots, -1)


def _padded_rows(
    pool: Tensor, batch: LoRABatch, slots: Tensor, layer: int, target: int, ab: int, width: int
) -> Tensor:
    """[c, max_rank, width]: each token's A (ab=0) or B^T (ab=1) rows, zero past its rank."""
    safe = slots.clamp(min=0)
    rank = batch.ranks[safe, layer, target]  # [c]
    j = torch.arange(batch.max_rank, device=pool.device)
    live = (j[None, :] < rank[:, None]) & (slots >= 0)[:, None]  # [c, R]
    offsets = batch.row_offsets[safe, layer, target, ab, : batch.max_rank]  # [c, R]
    # Row i of the window view is pool[i : i + width]: a row gather without an index per element.
    windows = pool.as_strided((pool.numel() - width + 1, width), (1, 1))
    rows = windows.index_select(0, torch.where(live, offsets, 0).view(-1))
    return torch.where(live[..., None], rows.view(*offsets.shape, width), 0)


def lora_apply_bmm(
    x: Tensor,  # [T, in_features]
    y: Tensor,  # [T, out_total], updated in place (may be a strided view)
    pool: Tensor,  # [P] the page pool viewed flat
    batch: LoRABatch,
    layer: int,
    first_target: int,
    out_slices: Sequence[tuple[int, int]],  # per target (output column offset, width)
) -> None:
    """S-LoRA's "padded" ablation: every token row gathers its adapter's A and B^T rows
    padded with zeros to ``batch.max_rank`` (the engine's max_lora_rank) and two torch.bmm
    compute its delta, in x's dtype. Rows outside every segment get an exact zero delta.
    No host sync; scratch bounded by _BMM_CHUNK_ELEMS.

    Segments of several rows (prefill) gather their adapter once per segment, not per row:
    rows padded to ``batch.max_seg_len`` per segment, one bmm per chunk of segments."""
    if batch.num_segments == 0:
        return
    _check_call(x, y, pool, first_target, out_slices)
    if batch.max_seg_len > 1:
        _bmm_by_segment(x, y, pool, batch, layer, first_target, out_slices)
        return
    slots = _token_slots(batch, x.shape[0], x.device)
    widest = max(x.shape[1], *(n for _, n in out_slices))
    chunk = max(1, _BMM_CHUNK_ELEMS // (batch.max_rank * widest))
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        for k, (o, n) in enumerate(out_slices):
            delta = _bmm_delta(x[rows], pool, batch, slots[rows], layer, first_target + k, n)
            y[rows, o : o + n] = (y[rows, o : o + n].float() + delta).to(y.dtype)


def _bmm_by_segment(
    x: Tensor,
    y: Tensor,
    pool: Tensor,
    batch: LoRABatch,
    layer: int,
    first_target: int,
    out_slices: Sequence[tuple[int, int]],
) -> None:
    """lora_apply_bmm over [segments, max_seg_len] padded row blocks: each segment's A and
    B^T rows (padded to max_rank) gathered once, two bmm per chunk of segments. The deltas
    are summed in fp32 per row, then added to y once (one rounding, as the per-row path)."""
    seg_len = batch.max_seg_len
    widest = max(x.shape[1], *(n for _, n in out_slices))
    chunk = max(1, _BMM_CHUNK_ELEMS // (max(seg_len, batch.max_rank) * widest))
    steps = torch.arange(seg_len, device=x.device)
    deltas = [
        torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device) for _, n in out_slices
    ]
    for first in range(0, batch.num_segments, chunk):
        count = min(chunk, batch.num_segments - first)
        starts = batch.seg_start[first : first + count + 1].long()
        rows = starts[:-1, None] + steps  # [c, L]
        live = rows < starts[1:, None]
        rows = torch.where(live, rows, 0)
        xs = torch.where(live[..., None], x[rows.view(-1)].view(count, seg_len, -1), 0)
        slots = batch.seg_slot[first : first + count].long()
        for k, (_, n) in enumerate(out_slices):
            target = first_target + k
            a = _padded_rows(pool, batch, slots, layer, target, 0, x.shape[1])  # [c, R, in]
            b_t = _padded_rows(pool, batch, slots, layer, target, 1, n)  # [c, R, n]
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b_t).float()  # [c, L, n]
            scaling = batch.scalings[slots.clamp(min=0), layer, target]
            delta = delta * torch.where(slots >= 0, scaling, 0.0)[:, None, None]
            delta = torch.where(live[..., None], delta, 0.0)  # padding rows add 0 to row 0
            deltas[k].index_add_(0, rows.view(-1), delta.view(-1, n))
    for (o, n), delta in zip(out_slices, deltas, strict=True):
        y[:, o : o + n] = (y[:, o : o + n].float() + delta).to(y.dtype)


def _bmm_delta(
    x: Tensor, pool: Tensor, batch: LoRABatch, slots: Tensor, layer: int, target: int, n: int
) -> Tensor:
    """fp32 [c, n]: scaling * (x A^T) B^T of each row's adapter, A and B^T padded."""
    a = _padded_rows(pool, batch, slots, layer, target, 0, x.shape[1])  # [c, R, in]
    b_t = _padded_rows(pool, batch, slots, layer, target, 1, n)  # [c, R, n]
    v = torch.bmm(x[:, None, :], a.transpose(1, 2))  # [c, 1, R]
    delta = torch.bmm(v, b_t)[:, 0].float()  # [c, n]
    scaling = batch.scalings[slots.clamp(min=0), layer, target]  # [c]
    return delta * torch.where(slots >= 0, scaling, 0.0)[:, None]


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _segment(seg_start_ptr, seg_slot_ptr, seg, layer, first_target, num_layers):
    """(first token row, rows, flat index of (slot, layer, first_target) in ranks).

    A base-only segment (slot -1) has 0 rows.
    """
    start = tl.load(seg_start_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rows = tl.where(slot >= 0, tl.load(seg_start_ptr + seg + 1) - start, 0)
    entry = (tl.maximum(slot, 0) * num_layers + layer) * 7 + first_target
    return start.to(tl.int64), rows, entry


@triton.jit
def _a_columns(
    row_offsets_ptr,
    ranks_ptr,
    entry,  # flat (slot, layer, first_target) index
    c_tile,
    table_rank,
    N_TARGETS: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    DENSE: tl.constexpr = False,
):
    """Shrink column c is row c % R_PAD of target c // R_PAD's A; DENSE: the segment's live
    rows packed, target after target (c < rank_0: row c of target 0, then target 1's...), so
    a small-rank adapter fills one program's columns instead of a few in each of several.

    Returns v columns [BLOCK_C] (t * R_PAD + row), live [BLOCK_C] (row < rank), A row offsets
    [BLOCK_C] int64.
    """
    cols = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    if DENSE:
        r0 = tl.load(ranks_ptr + entry)
        r1 = tl.load(ranks_ptr + entry + 1, mask=N_TARGETS > 1, other=0)
        r2 = tl.load(ranks_ptr + entry + 2, mask=N_TARGETS > 2, other=0)
        t = (cols >= r0).to(tl.int32) + (cols >= r0 + r1).to(tl.int32)
        j = cols - tl.where(t == 0, 0, tl.where(t == 1, r0, r0 + r1))
        live = cols < r0 + r1 + r2
    else:
        t = cols // R_PAD
        j = cols % R_PAD
        rank = tl.load(ranks_ptr + entry + t, mask=t < N_TARGETS, other=0)
        live = j < rank
    a_off = tl.load(row_offsets_ptr + (entry + t) * 2 * table_rank + j, mask=live, other=0)
    return t * R_PAD + j, live, tl.multiple_of(a_off, ROW_ALIGN)


@triton.jit
def _shrink_step(acc, x_row, pool_ptr, a_off, live, k0, k_hi, stride_x_k, BLOCK_K: tl.constexpr):
    """acc [BLOCK_C, BLOCK_K] += A[:, k0 : k0 + BLOCK_K] * x[k0 : k0 + BLOCK_K]."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < k_hi
    xk = tl.load(x_row + k * stride_x_k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
    a_mask = live[:, None] & k_ok[None, :]
    a = tl.load(pool_ptr + a_off[:, None] + k[None, :], mask=a_mask, other=0.0)
    return acc + a.to(tl.float32) * xk[None, :]


@triton.jit
def _shrink_row(
    acc, x_row, pool_ptr, a_off, live, k_lo, k_hi, stride_x_k, BLOCK_K: tl.constexpr, STAGES
):
    """acc [rows of A, BLOCK_K] += A[:, k] * x[k] for k in k_lo .. k_hi; STAGES > 1: the
    compiler pipelines the loop's loads, STAGES iterations in flight."""
    if STAGES > 1:
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            acc = _shrink_step(acc, x_row, pool_ptr, a_off, live, k0, k_hi, stride_x_k, BLOCK_K)
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            acc = _shrink_step(acc, x_row, pool_ptr, a_off, live, k0, k_hi, stride_x_k, BLOCK_K)
    return acc


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _shrink_decode_kernel(
    x_ptr,
    v_ptr,
    pool_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    row_offsets_ptr,
    ranks_ptr,
    layer,
    first_target,
    num_layers,
    table_rank,
    in_features,
    k_blocks,  # BLOCK_K blocks of input features per K split
    split_k,
    stride_x_tok,
    stride_x_k,
    stride_v_split,
    stride_v_tok,
    N_TARGETS: tl.constexpr,
    R_PAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DENSE: tl.constexpr,  # the segment's live A rows packed into the columns (_a_columns)
    STAGES: tl.constexpr = 0,  # > 1: the K loop as tl.range(num_stages=STAGES)
):
    """One program: one single-token segment x BLOCK_C shrink columns x one K split."""
    seg = tl.program_id(0)
    c_tile = tl.program_id(2) // split_k
    split = tl.program_id(2) % split_k
    tok, rows, entry = _segment(seg_start_ptr, seg_slot_ptr, seg, layer, first_target, num_layers)
    cols, live, a_off = _a_columns(
        row_offsets_ptr,
        ranks_ptr,
        entry,
        c_tile,
        table_rank,
        N_TARGETS,
        R_PAD,
        BLOCK_C,
        ROW_ALIGN,
        DENSE,
    )
    if (rows == 0) | (tl.max(live.to(tl.int32), axis=0) == 0):
        return
    # In BLOCK_K units, so the compiler knows every bound is a multiple of BLOCK_K (k_blocks
    # itself is not specialised): wide loads along K, masks constant per vector.
    k_lo = split * k_blocks * BLOCK_K
    k_hi = tl.minimum(in_features, k_lo + k_blocks * BLOCK_K)
    x_row = x_ptr + tok * stride_x_tok
    acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)  # reduced over K once, at the end
    acc = _shrink_row(acc, x_row, pool_ptr, a_off, live, k_lo, k_hi, stride_x_k, BLOCK_K, STAGES)
    v_row = v_ptr + split * stride_v_split + tok * stride_v_tok
    tl.store(v_row + cols, tl.sum(acc, axis=1), mask=live)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _shrink_prefill_kernel(
    x_ptr,
    v_ptr,
    pool_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    row_offsets_ptr,
    ranks_ptr,
    layer,
    first_target,
    num_layers,
    table_rank,
    in_features,
    k_blocks,  # BLOCK_K blocks of input features per K split
    split_k,
    stride_x_tok,
    stride_x_k,
    stride_v_split,
    stride_v_tok,
    tile_map_ptr,
    tile_count_ptr,
    N_TARGETS: tl.constexpr,
    R_PAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILE_MAP: tl.constexpr,  # program_id(0) indexes tile_map_ptr's (segment, row tile)
    PERSISTENT: tl.constexpr,  # programs of axis 0 stride over tile_count_ptr's live entries
    STAGES: tl.constexpr = 0,  # > 1: the K loop as tl.range(num_stages=STAGES)
):
    """One program: BLOCK_M rows of one segment (each of its map entries, persistent) x
    BLOCK_C shrink columns x one K split."""
    c_tile = tl.program_id(2) // split_k
    split = tl.program_id(2) % split_k
    first, end, step = program_entries(tile_count_ptr, PERSISTENT)
    for e in range(first, end, step):
        seg, m_tile = tile_entry(tile_map_ptr, e, TILE_MAP, PERSISTENT, 0)
        if seg >= 0:  # (segment, row tile) grid axes without a map
            _shrink_tile(
                x_ptr, v_ptr, pool_ptr, seg_start_ptr, seg_slot_ptr, row_offsets_ptr,
                ranks_ptr, seg, m_tile, c_tile, split, layer, first_target, num_layers,
                table_rank, in_features, k_blocks, stride_x_tok, stride_x_k, stride_v_split,
                stride_v_tok, N_TARGETS, R_PAD, ROW_ALIGN, BLOCK_M, BLOCK_C, BLOCK_K,
                DOT_PRECISION, STAGES,
            )  # fmt: skip


@triton.jit
def _shrink_tile(
    x_ptr,
    v_ptr,
    pool_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    row_offsets_ptr,
    ranks_ptr,
    seg,
    m_tile,
    c_tile,
    split,
    layer,
    first_target,
    num_layers,
    table_rank,
    in_features,
    k_blocks,
    stride_x_tok,
    stride_x_k,
    stride_v_split,
    stride_v_tok,
    N_TARGETS: tl.constexpr,
    R_PAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STAGES: tl.constexpr,
):
    """The prefill-form shrink of one (segment, row tile, column tile, K split)."""
    start, rows, entry = _segment(seg_start_ptr, seg_slot_ptr, seg, layer, first_target, num_layers)
    cols, live, a_off = _a_columns(
        row_offsets_ptr,
        ranks_ptr,
        entry,
        c_tile,
        table_rank,
        N_TARGETS,
        R_PAD,
        BLOCK_C,
        ROW_ALIGN,
    )
    if (m_tile * BLOCK_M < rows) & (tl.max(live.to(tl.int32), axis=0) > 0):
        m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < rows
        tok = start + m  # [BLOCK_M] int64
        # In BLOCK_K units, so the compiler knows every bound is a multiple of BLOCK_K
        # (k_blocks itself is not specialised): wide loads along K, masks constant per vector.
        k_lo = split * k_blocks * BLOCK_K
        k_hi = tl.minimum(in_features, k_lo + k_blocks * BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        if STAGES > 1:  # the compiler pipelines the loop's loads, STAGES iterations in flight
            for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
                acc = _shrink_dot(
                    acc, x_ptr, pool_ptr, tok, m_ok, a_off, live, k0, k_hi, stride_x_tok,
                    stride_x_k, BLOCK_K, DOT_PRECISION,
                )  # fmt: skip
        else:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                acc = _shrink_dot(
                    acc, x_ptr, pool_ptr, tok, m_ok, a_off, live, k0, k_hi, stride_x_tok,
                    stride_x_k, BLOCK_K, DOT_PRECISION,
                )  # fmt: skip
        v_ptrs = v_ptr + split * stride_v_split + tok[:, None] * stride_v_tok + cols[None, :]
        tl.store(v_ptrs, acc, mask=m_ok[:, None] & live[None, :])


@triton.jit
def _shrink_dot(
    acc,
    x_ptr,
    pool_ptr,
    tok,
    m_ok,
    a_off,
    live,
    k0,
    k_hi,
    stride_x_tok,
    stride_x_k,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc [M, C] += x[tok, k0 : k0 + BLOCK_K] @ A[:, k0 : k0 + BLOCK_K]^T."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < k_hi
    x_ptrs = x_ptr + tok[:, None] * stride_x_tok + k[None, :] * stride_x_k
    xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [M, K]
    a_mask = live[:, None] & k_ok[None, :]
    a = tl.load(pool_ptr + a_off[:, None] + k[None, :], mask=a_mask, other=0.0)  # [C, K]
    return tl.dot(xt, tl.trans(a), acc, input_precision=DOT_PRECISION)


@triton.jit
def _out_slice(t, o0, n0, o1, n1, o2, n2):
    """(first output column, width) of the call's target t."""
    o = tl.where(t == 0, o0, tl.where(t == 1, o1, o2))
    n = tl.where(t == 0, n0, tl.where(t == 1, n1, n2))
    return o, n


@triton.jit
def _expand_target(
    ranks_ptr, scalings_ptr, entry, t, n_tile, o0, n0, o1, n1, o2, n2, BLOCK_N: tl.constexpr
):
    """(rank, scaling, first output column, width, skip) of this expand program's target."""
    rank = tl.load(ranks_ptr + entry + t)
    scale = tl.load(scalings_ptr + entry + t)
    o, n = _out_slice(t, o0, n0, o1, n1, o2, n2)
    return rank, scale, o, n, (rank == 0) | (n_tile * BLOCK_N >= n)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _expand_decode_kernel(
    y_ptr,
    v_ptr,
    pool_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    row_offsets_ptr,
    ranks_ptr,
    scalings_ptr,
    layer,
    first_target,
    num_layers,
    table_rank,
    n_tiles,
    split_k,
    o0,
    n0,
    o1,
    n1,
    o2,
    n2,
    stride_y_tok,
    stride_y_n,
    stride_v_split,
    stride_v_tok,
    n_group,  # BLOCK_N tiles per program
    R_PAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_S: tl.constexpr,  # split_k padded to a power of two
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RANK_PACK: tl.constexpr = False,  # with R_PAD <= BLOCK_R: see _expand_packed
):
    """One program: one single-token segment x one target x n_group tiles of BLOCK_N output
    columns, one after another (the segment's rank, scaling and B^T row offsets are looked
    up once for all of them: a program per tile spends most of its time on those lookups)."""
    seg = tl.program_id(0)
    groups = tl.cdiv(n_tiles, n_group)
    t = tl.program_id(2) // groups
    first_tile = (tl.program_id(2) % groups) * n_group
    tok, rows, entry = _segment(seg_start_ptr, seg_slot_ptr, seg, layer, first_target, num_layers)
    rank, scale, o, n, skip = _expand_target(
        ranks_ptr, scalings_ptr, entry, t, first_tile, o0, n0, o1, n1, o2, n2, BLOCK_N
    )
    if skip | (rows == 0):
        return
    b_table = row_offsets_ptr + ((entry + t) * 2 + 1) * table_rank
    v_row = v_ptr + tok * stride_v_tok + t * R_PAD
    splits = tl.arange(0, BLOCK_S)
    last_tile = tl.minimum(first_tile + n_group, tl.cdiv(n, BLOCK_N))
    if RANK_PACK and R_PAD <= BLOCK_R:
        # The segment's rank rounded up to a power of two picks how many output tiles share
        # one [BLOCK_R, BLOCK_N] load: a rank-8 row reads 8 tiles' B^T at once, not one
        # tile's with 56 of its 64 rows masked off.
        for k in tl.static_range(4):  # G = BLOCK_R / 8, / 4, / 2, / 1: the one that fits
            if (rank > ((BLOCK_R >> (4 - k)) if k > 0 else 0)) & (rank <= (BLOCK_R >> (3 - k))):
                _expand_packed(
                    y_ptr, v_ptr, pool_ptr, b_table, v_row, tok, rank, scale, o, n, split_k,
                    first_tile, last_tile, stride_y_tok, stride_y_n, stride_v_split,
                    BLOCK_R >> (3 - k), ROW_ALIGN, BLOCK_S, BLOCK_R, BLOCK_N,
                )  # fmt: skip
    elif R_PAD <= BLOCK_R:
        # Every rank in one step: v and the B^T row offsets are looked up once for all the
        # program's tiles, so each tile waits for one load (B^T, y beside it), not a chain.
        j = tl.arange(0, BLOCK_R)
        j_ok = j < rank
        v_ptrs = v_row + splits[:, None] * stride_v_split + j[None, :]  # [S, BLOCK_R]
        v_mask = (splits[:, None] < split_k) & j_ok[None, :]
        vj = tl.sum(tl.load(v_ptrs, mask=v_mask, other=0.0), axis=0)  # all partials
        b_off = tl.multiple_of(tl.load(b_table + j, mask=j_ok, other=0), ROW_ALIGN)
        _add_whole_rank(
            y_ptr, pool_ptr, tok, o, n, first_tile, last_tile, vj, scale, b_off, j_ok,
            stride_y_tok, stride_y_n, BLOCK_N,
        )  # fmt: skip
    else:
        for n_tile in range(first_tile, last_tile):
            cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = cols < n
            y_ptrs = y_ptr + tok * stride_y_tok + (o + cols) * stride_y_n
            y = tl.load(y_ptrs, mask=n_ok, other=0.0)  # issued early: hides behind B's latency
            acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)  # reduced over rank at the end
            for r0 in range(0, rank, BLOCK_R):
                j = r0 + tl.arange(0, BLOCK_R)
                j_ok = j < rank
                v_ptrs = v_row + splits[:, None] * stride_v_split + j[None, :]  # [S, BLOCK_R]
                v_mask = (splits[:, None] < split_k) & j_ok[None, :]
                vj = tl.sum(tl.load(v_ptrs, mask=v_mask, other=0.0), axis=0)  # all partials
                b_off = tl.multiple_of(tl.load(b_table + j, mask=j_ok, other=0), ROW_ALIGN)
                b_mask = j_ok[:, None] & n_ok[None, :]
                b = tl.load(pool_ptr + b_off[:, None] + cols[None, :], mask=b_mask, other=0.0)
                acc += vj[:, None] * b.to(tl.float32)
            y = y.to(tl.float32) + scale * tl.sum(acc, axis=0)
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _add_whole_rank(
    y_ptr,
    pool_ptr,
    tok,
    o,
    n,
    first_tile,
    last_tile,
    v,  # [BLOCK_R] fp32, one token's x . A^T (every partial added)
    scale,
    b_off,  # [BLOCK_R] B^T row offsets
    j_ok,  # [BLOCK_R] rank rows that exist
    stride_y_tok,
    stride_y_n,
    BLOCK_N: tl.constexpr,
):
    """y[tok, o + cols] += scale * v . B^T[:, cols] over the output tiles first_tile ..
    last_tile of one target, the whole rank in each step: each tile waits for one load
    (B^T, y beside it), not a chain."""
    for n_tile in range(first_tile, last_tile):
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < n
        y_ptrs = y_ptr + tok * stride_y_tok + (o + cols) * stride_y_n
        y = tl.load(y_ptrs, mask=n_ok, other=0.0)
        b_mask = j_ok[:, None] & n_ok[None, :]
        b = tl.load(pool_ptr + b_off[:, None] + cols[None, :], mask=b_mask, other=0.0)
        y = y.to(tl.float32) + scale * tl.sum(v[:, None] * b.to(tl.float32), axis=0)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _expand_packed(
    y_ptr,
    v_ptr,
    pool_ptr,
    b_table,
    v_row,
    tok,
    rank,
    scale,
    o,
    n,
    split_k,
    first_tile,
    last_tile,
    stride_y_tok,
    stride_y_n,
    stride_v_split,
    G: tl.constexpr,  # rank rows per output tile: a power of two >= rank
    ROW_ALIGN: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y[tok, o + cols] += scale * v . B^T[:, cols] for the program's tiles, BLOCK_R // G
    tiles per step: slot s of the [BLOCK_R, BLOCK_N] B^T load holds rank row s % G of tile
    s // G, and each tile's G rows are summed apart (a reshape to [tiles, G, BLOCK_N])."""
    C: tl.constexpr = BLOCK_R // G
    s = tl.arange(0, BLOCK_R)
    j = s % G
    j_ok = j < rank
    splits = tl.arange(0, BLOCK_S)
    v_ptrs = v_row + splits[:, None] * stride_v_split + j[None, :]  # [S, BLOCK_R]
    v_mask = (splits[:, None] < split_k) & j_ok[None, :]
    vj = tl.sum(tl.load(v_ptrs, mask=v_mask, other=0.0), axis=0)  # all partials
    b_off = tl.multiple_of(tl.load(b_table + j, mask=j_ok, other=0), ROW_ALIGN)
    col_end = tl.minimum(last_tile * BLOCK_N, n)
    tile_cols = (s // G)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [BLOCK_R, N]
    out_cols = tl.arange(0, C)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [C, N]
    for start in range(first_tile * BLOCK_N, col_end, C * BLOCK_N):
        cols = start + tile_cols
        b_mask = j_ok[:, None] & (cols < col_end)
        b = tl.load(pool_ptr + b_off[:, None] + cols, mask=b_mask, other=0.0)
        part = tl.sum(tl.reshape(vj[:, None] * b.to(tl.float32), (C, G, BLOCK_N)), axis=1)
        y_cols = start + out_cols
        y_ok = y_cols < col_end
        y_ptrs = y_ptr + tok * stride_y_tok + (o + y_cols) * stride_y_n
        y = tl.load(y_ptrs, mask=y_ok, other=0.0).to(tl.float32) + scale * part
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_ok)


@triton.jit(do_not_specialize=_RUNTIME_INTS + ("n_split",))
def _fused_decode_kernel(
    x_ptr,
    y_ptr,
    pool_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    row_offsets_ptr,
    ranks_ptr,
    scalings_ptr,
    layer,
    first_target,
    num_layers,
    table_rank,
    in_features,
    n_split,  # programs per (segment, target), each expanding its share of the tiles
    o0,
    n0,
    o1,
    n1,
    o2,
    n2,
    stride_x_tok,
    stride_x_k,
    stride_y_tok,
    stride_y_n,
    ROW_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,  # >= every rank: the whole rank in each step
    BLOCK_K: tl.constexpr,  # K block of the smallest rank class (halved for each larger)
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr = 0,  # > 1: the K loop as tl.range(num_stages=STAGES)
    RANK_CLASSES: tl.constexpr = 1,  # rank rows per step BLOCK_R >> (RANK_CLASSES - 1) ...
):
    """Shrink and expand in one launch: one program per (one-token segment, target, 1 /
    n_split of the target's output tiles). It computes its target's v = x . A^T over the
    whole of K into registers, then adds scale * v . B^T to its tiles of y. Each target has
    an A of its own, so nothing is recomputed unless n_split > 1 (each part reads A again,
    from L2), and no fp32 scratch goes through memory.

    A program's rank picks its tile shape (RANK_CLASSES > 1): the smallest class of rank
    rows G = BLOCK_R >> c that holds it, with K blocks as much wider as G is narrower, so a
    rank-8 row in tables laid out for rank 16 steps through K as fast as in tables for 8
    (each step's latency, not its bytes, bounds a program)."""
    seg = tl.program_id(0)
    t = tl.program_id(1) // n_split
    part = tl.program_id(1) % n_split
    tok, rows, entry = _segment(seg_start_ptr, seg_slot_ptr, seg, layer, first_target, num_layers)
    rank = tl.load(ranks_ptr + entry + t)
    o, n = _out_slice(t, o0, n0, o1, n1, o2, n2)
    per_part = tl.cdiv(tl.cdiv(n, BLOCK_N), n_split)
    first_tile = part * per_part
    last_tile = tl.minimum(first_tile + per_part, tl.cdiv(n, BLOCK_N))
    if (rows == 0) | (rank == 0) | (first_tile >= last_tile):
        return
    scale = tl.load(scalings_ptr + entry + t)
    table = row_offsets_ptr + (entry + t) * 2 * table_rank
    x_row = x_ptr + tok * stride_x_tok
    for c in tl.static_range(RANK_CLASSES):  # class c: ranks in (G / 2, G], G = BLOCK_R >> ...
        g_lo = (BLOCK_R >> (RANK_CLASSES - c)) if c > 0 else 0  # (class 0 from rank 1)
        if (rank > g_lo) & (rank <= (BLOCK_R >> (RANK_CLASSES - 1 - c))):
            _fused_row(
                y_ptr, pool_ptr, table, table_rank, x_row, tok, rank, scale, o, n,
                first_tile, last_tile, in_features, stride_x_k, stride_y_tok, stride_y_n,
                ROW_ALIGN, BLOCK_R >> (RANK_CLASSES - 1 - c), BLOCK_K >> c, BLOCK_N, STAGES,
            )  # fmt: skip


@triton.jit
def _fused_row(
    y_ptr,
    pool_ptr,
    table,  # the (adapter, layer, target)'s A row offsets, its B^T ones table_rank after
    table_rank,
    x_row,
    tok,
    rank,
    scale,
    o,
    n,
    first_tile,
    last_tile,
    in_features,
    stride_x_k,
    stride_y_tok,
    stride_y_n,
    ROW_ALIGN: tl.constexpr,
    G: tl.constexpr,  # rank rows per step (>= rank)
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """_fused_decode_kernel's work for one (row, target, part) in [G, BLOCK_K] A steps."""
    j = tl.arange(0, G)
    j_ok = j < rank
    a_off = tl.multiple_of(tl.load(table + j, mask=j_ok, other=0), ROW_ALIGN)
    b_off = tl.multiple_of(tl.load(table + table_rank + j, mask=j_ok, other=0), ROW_ALIGN)
    acc = tl.zeros([G, BLOCK_K], dtype=tl.float32)  # reduced over K once, at the end
    acc = _shrink_row(
        acc, x_row, pool_ptr, a_off, j_ok, 0, in_features, stride_x_k, BLOCK_K, STAGES
    )
    v = scale * tl.sum(acc, axis=1)  # [G]
    _add_whole_rank(
        y_ptr, pool_ptr, tok, o, n, first_tile, last_tile, v, 1.0, b_off, j_ok,
        stride_y_tok, stride_y_n, BLOCK_N,
    )  # fmt: skip


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _expand_prefill_kernel(
    y_ptr,
    v_ptr,
    pool_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    row_offsets_ptr,
    ranks_ptr,
    scalings_ptr,
    layer,
    first_target,
    num_layers,
    table_rank,
    n_tiles,
    split_k,
    o0,
    n0,
    o1,
    n1,
    o2,
    n2,
    stride_y_tok,
    stride_y_n,
    stride_v_split,
    stride_v_tok,
    tile_map_ptr,
    tile_count_ptr,
    R_PAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILE_MAP: tl.constexpr,  # program_id(0) indexes tile_map_ptr's (segment, row tile)
    PERSISTENT: tl.constexpr,  # programs of axis 0 stride over tile_count_ptr's live entries
):
    """One program: BLOCK_M rows of one segment (each of its map entries, persistent) x one
    target x BLOCK_N output columns."""
    t = tl.program_id(2) // n_tiles
    n_tile = tl.program_id(2) % n_tiles
    first, end, step = program_entries(tile_count_ptr, PERSISTENT)
    for e in range(first, end, step):
        seg, m_tile = tile_entry(tile_map_ptr, e, TILE_MAP, PERSISTENT, 0)
        if seg >= 0:  # (segment, row tile) grid axes without a map
            _expand_tile(
                y_ptr, v_ptr, pool_ptr, seg_start_ptr, seg_slot_ptr, row_offsets_ptr,
                ranks_ptr, scalings_ptr, seg, m_tile, t, n_tile, layer, first_target,
                num_layers, table_rank, split_k, o0, n0, o1, n1, o2, n2, stride_y_tok,
                stride_y_n, stride_v_split, stride_v_tok, R_PAD, ROW_ALIGN, BLOCK_M, BLOCK_R,
                BLOCK_N, DOT_PRECISION,
            )  # fmt: skip


@triton.jit
def _expand_tile(
    y_ptr,
    v_ptr,
    pool_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    row_offsets_ptr,
    ranks_ptr,
    scalings_ptr,
    seg,
    m_tile,
    t,
    n_tile,
    layer,
    first_target,
    num_layers,
    table_rank,
    split_k,
    o0,
    n0,
    o1,
    n1,
    o2,
    n2,
    stride_y_tok,
    stride_y_n,
    stride_v_split,
    stride_v_tok,
    R_PAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The prefill-form expand of one (segment, row tile, target, output column tile)."""
    start, rows, entry = _segment(seg_start_ptr, seg_slot_ptr, seg, layer, first_target, num_layers)
    rank, scale, o, n, skip = _expand_target(
        ranks_ptr, scalings_ptr, entry, t, n_tile, o0, n0, o1, n1, o2, n2, BLOCK_N
    )
    if (skip == 0) & (m_tile * BLOCK_M < rows):
        m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < rows
        tok = start + m  # [BLOCK_M] int64
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < n
        b_table = row_offsets_ptr + ((entry + t) * 2 + 1) * table_rank
        v_rows = v_ptr + tok[:, None] * stride_v_tok + t * R_PAD  # [BLOCK_M, 1]
        y_ptrs = y_ptr + tok[:, None] * stride_y_tok + (o + cols[None, :]) * stride_y_n
        y_mask = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0)  # issued early: hides behind B's latency
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            j = r0 + tl.arange(0, BLOCK_R)
            j_ok = j < rank
            v_mask = m_ok[:, None] & j_ok[None, :]
            vt = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for s in range(split_k):
                vt += tl.load(v_rows + s * stride_v_split + j[None, :], mask=v_mask, other=0.0)
            b_off = tl.multiple_of(tl.load(b_table + j, mask=j_ok, other=0), ROW_ALIGN)
            b_mask = j_ok[:, None] & n_ok[None, :]
            b = tl.load(pool_ptr + b_off[:, None] + cols[None, :], mask=b_mask, other=0.0)
            acc = tl.dot(vt, b.to(tl.float32), acc, input_precision=DOT_PRECISION)
        y = y.to(tl.float32) + scale * acc
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)


class LoRATiles(NamedTuple):
    """Block sizes of one lora_apply_triton call."""

    block_m: int  # token rows per shrink program; 1 = the decode (matrix-vector) kernels
    block_c: int  # shrink columns ((target, rank row) pairs) per program
    block_k: int  # input features per shrink step
    split_k: int  # shrink programs that split one tile's input features
    block_r: int  # rank rows per expand step
    block_n: int  # output columns per expand program
    shrink_warps: int = 4
    expand_warps: int = 4
    expand_block_m: int = 0  # token rows per expand program; 0 = block_m
    n_group: int = 1  # decode form: BLOCK_N output tiles per expand program, in turn
    dense: int = 0  # decode form: 1 = each segment's live A rows packed into the columns
    # decode form, whole rank per expand step: 1 = a small rank's B^T rows of several output
    # tiles in one [block_r, block_n] load (_expand_packed)
    rank_pack: int = 0
    # > 1 = the shrink's K loop pipelined over this many stages (tl.range)
    shrink_stages: int = 0
    # decode form: > 0 = shrink and expand in one launch (_fused_decode_kernel), each
    # (row, target)'s output tiles split over this many programs; block_r >= max_rank,
    # split_k 1, shrink_warps its warps (block_c, expand_warps, n_group unused)
    fused: int = 0

    @property
    def expand_m(self) -> int:
        return self.expand_block_m or self.block_m


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the CPU interpreter runs programs one by one: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _r_pad(max_rank: int) -> int:
    """Per-target stride of the shrink columns: a power of two >= max(16, max_rank)."""
    return max(16, next_power_of_2(max_rank))


def pick_tiles(
    batch: LoRABatch, in_features: int, n_targets: int, max_out: int, num_sms: int
) -> LoRATiles:
    """Block sizes for a call (cached: a few host ints decide them)."""
    if batch.grouped_rows:
        r_pad = _r_pad(batch.max_rank)
        shape = (batch.grouped_rows, in_features, n_targets, max_out, num_sms)
        return _grouped_tiles(r_pad, *shape)
    fused = (batch.fused_decode, batch.max_seg_len, batch.max_rank, batch.fused_max_rank)
    if fuses_decode(*fused):
        shape = (batch.max_rank, batch.num_segments, in_features, n_targets, max_out, num_sms)
        return _fused_tiles(*shape)
    shape = (batch.max_rank, batch.max_seg_len, batch.num_segments)
    tiles = _pick_tiles(*shape, in_features, n_targets, max_out, num_sms)
    if batch.rank_pack and tiles.block_m == 1:
        tiles = tiles._replace(rank_pack=1)
    return tiles


@functools.lru_cache(maxsize=4096)
def _pick_tiles(
    max_rank: int,
    max_seg_len: int,
    num_segments: int,
    in_features: int,
    n_targets: int,
    max_out: int,
    num_sms: int,
) -> LoRATiles:
    r_pad = _r_pad(max_rank)
    if max_seg_len == 1:
        return _decode_tiles(r_pad, num_segments, in_features, n_targets, max_out, num_sms)
    shape = (max_seg_len, num_segments, in_features, n_targets, max_out)
    return _prefill_tiles(r_pad, *shape, num_sms)


def _split_k(programs: int, waves: int, cap: int, in_features: int, block_k: int, sms: int) -> int:
    """Splits of the input features that bring the shrink grid to about ``waves`` waves."""
    want = cdiv(waves * sms, programs)
    return max(1, min(want, cap, cdiv(in_features, block_k)))


def _decode_tiles(
    r_pad: int, num_segments: int, in_features: int, n_targets: int, max_out: int, num_sms: int
) -> LoRATiles:
    """Matrix-vector tiles, 2 warps (measured best on an H200).

    Shrink: A read as [16, block_k] tiles, K split to about two waves. block_k is 512 when
    the grid fills the GPU without a split (session 9's sweep: 160 rows of 152 adapters of
    ranks 8-64, q|k|v 39 vs 43 us and o 12 vs 18 us against 256; 256 rows of 52 rank-64
    adapters 61 vs 67 and 21 vs 30 us), else 256 (more, shorter programs to split over).

    Expand: the whole rank (up to 64) of B^T at once in [block_r, 512] tiles (session 9:
    mixed q|k|v 42 vs 46 us and o 16 vs 18 us against 128 columns; 256 columns ran 2-3x
    slower at every block_r tried, so the narrowing for small grids skips it), up to
    _EXPAND_MAX_N_GROUP tiles per program while enough programs per SM remain.

    Ranks <= 16 (r_pad 16, from the engine's max_lora_rank, which the page tables are laid
    out for): a rank-8 row fills half the padded columns, so the shrink packs
    each segment's live A rows into the columns (``dense``: rank 8 over 240 rows, q|k|v 14.1
    against 20.6 us) and the expand packs several tiles' B^T rows per load (``rank_pack``).
    Neither paid with larger ranks in the batch (the mixed-rank case: 39.8 vs 39.0 and 48.0
    vs 42.4 us)."""
    small = r_pad <= 16
    block_c = min(r_pad, 16)
    c_tiles = cdiv(n_targets * r_pad, block_c)
    block_k = 512 if num_segments * c_tiles >= num_sms else 256
    block_k = min(block_k, next_power_of_2(in_features))
    split_k = _split_k(
        num_segments * c_tiles, 2, _DECODE_MAX_SPLIT_K, in_features, block_k, num_sms
    )
    block_r = min(r_pad, 64)
    block_n = min(_DECODE_BLOCK_N, next_power_of_2(max_out))
    while block_n > 64 and num_segments * n_targets * cdiv(max_out, block_n) < num_sms:
        block_n //= 4 if block_n == 512 else 2
    # Several N tiles per expand program: each program looks its segment's rank, scaling and
    # B^T row offsets up once (dependent loads, about a memory latency each), not per tile.
    n_tiles = cdiv(max_out, block_n)
    programs = num_segments * n_targets * n_tiles
    min_programs = (_EXPAND_PROGRAMS_PER_SM_PACKED if small else _EXPAND_PROGRAMS_PER_SM) * num_sms
    n_group = 1
    while (
        2 * n_group <= min(n_tiles, _EXPAND_MAX_N_GROUP)
        and programs // (2 * n_group) >= min_programs
    ):
        n_group *= 2
    # The shrink's K loop pipelined 3 deep where several targets share the input (q|k|v,
    # gate|up; session 10's sweep: mixed-rank q|k|v 32.5 vs 39.2 us, 256 rows of 52 rank-64
    # adapters 55.7 vs 61.2 us). One target (o, down) gained nothing clear (25.5 vs 21.3 us
    # to 10.3 vs 12.0 over four cases), nor did the dense small-rank shrink (14.1 vs 14.1).
    stages = 3 if n_targets > 1 and not small else 0
    return LoRATiles(
        1, block_c, block_k, split_k, block_r, block_n, 2, 2,
        n_group=n_group, dense=int(small), rank_pack=int(small), shrink_stages=stages,
    )  # fmt: skip


# fp32 values in a fused decode program's shrink accumulator (64 a thread at 2 warps), which
# sets BLOCK_K by the rank
_FUSED_ACC_ELEMS = 4096
_FUSED_MIN_CLASS = 8  # rank rows of the fused kernel's smallest tile shape (fused_rank_classes)


def fused_rank_classes(block_r: int) -> int:
    """Tile shapes of the fused decode kernel (RANK_CLASSES): rank rows per step 8, 16, ...
    up to block_r, each program taking the smallest that holds its rank. Session 16's probe
    on an H200 at S1's batch (194 rows, 184 rank-8 adapters), LoRA's extra step time with
    one shape of block_r rows: 0.71 ms in tables for rank 8, 1.45 ms in tables for 16."""
    classes = 1
    while block_r >> classes >= _FUSED_MIN_CLASS:
        classes += 1
    return classes


def fuses_decode(
    fused_decode: bool, max_seg_len: int, max_rank: int, limit: int = FUSED_MAX_RANK
) -> bool:
    """Whether a batch's LoRA runs in one fused launch per call (LoRABatch.fused_decode, up
    to LoRABatch.fused_max_rank: ``limit``)."""
    return fused_decode and max_seg_len == 1 and max_rank <= limit


@functools.lru_cache(maxsize=4096)
def _fused_tiles(
    max_rank: int,
    num_segments: int,
    in_features: int,
    n_targets: int,
    max_out: int,
    num_sms: int,
) -> LoRATiles:
    """One launch per call: a program per (row, target) with the whole rank in each step,
    the K block as wide as _FUSED_ACC_ELEMS allows at that rank, 512 output columns per
    step, 2 warps, the K loop pipelined 3 deep, and each (row, target)'s output tiles split
    over several programs where the grid has fewer programs than SMs (each part reads A
    again, mostly from L2).

    Session 15's sweep on an H200, whole calls against the two launches (7B widths, us):
    rank 8 over 195 rows of 184 adapters q|k|v 24.1 vs 29.8 and o 8.7 vs 10.6; 64 rows
    q|k|v 8.5 vs 9.9 and o (split 3) 5.7 vs 7.3; 16 rows q|k|v (split 3) 5.6 vs 6.7; rank 16
    over 195 rows q|k|v 42.1 vs 55.3 (its K block 256: 512 took 88) and o 20.5 vs 20.4.
    Splits past one program per SM lost (q|k|v over 195 rows: 29.4 with 2), as did 4 or 8
    warps (2-4x slower) and 128-256 output columns."""
    block_r = max(2, next_power_of_2(max_rank))
    smallest = block_r >> (fused_rank_classes(block_r) - 1)  # rank rows of the first class
    block_k = min(max(32, _FUSED_ACC_ELEMS // smallest), next_power_of_2(in_features))
    block_n = min(512, next_power_of_2(max_out))
    want = cdiv(num_sms, max(1, num_segments * n_targets))
    n_split = max(1, min(want, cdiv(max_out, block_n)))
    return LoRATiles(1, 16, block_k, 1, block_r, block_n, 2, 2, fused=n_split, shrink_stages=3)


@functools.lru_cache(maxsize=4096)
def _grouped_tiles(
    r_pad: int, rows: int, in_features: int, n_targets: int, max_out: int, num_sms: int
) -> LoRATiles:
    """A decode batch of ``rows`` rows grouped by adapter: the prefill form with 16-row tiles
    (one tile per adapter for up to 16 of its rows; tl.dot's minimum), so an adapter's A and
    B^T are read once per step, not once per row. The grids are persistent (a fixed number
    of programs strides over the live tiles), so the K split is picked for an expected
    ~4 rows per adapter (S2 at saturation: 256 rows, ~52 adapters): to about two waves,
    four where the unsplit grid fills under half the GPU, up to 8 splits. (Session 14's
    sweep, shrink + expand against the earlier two waves and 4 splits at most: o over 256
    rows of 52 rank-64 adapters 23.5 vs 26.1 us, rank-16 q|k|v over 64 groups of 4 rows
    29.1 vs 31.4, S4 n = 5's 29 rows of 5 adapters q|k|v 14.5 vs 17.1; q|k|v over the 52
    rank-64 adapters, whose unsplit grid is a wave already, was best at its 3 splits.)"""
    block_c = min(128, next_power_of_2(n_targets * r_pad))
    block_k = min(64, max(16, next_power_of_2(in_features)))
    programs = cdiv(rows, 4) * cdiv(n_targets * r_pad, block_c)
    waves = 4 if 2 * programs < num_sms else 2
    split_k = _split_k(programs, waves, 8, in_features, block_k, num_sms)
    block_r = min(r_pad, 64)  # the whole rank at once: 47 vs 59 us at rank 64 (session 7)
    # 256 output columns per expand program: session 9's sweep, S2's 256 rows in 52 groups,
    # q|k|v 42 vs 48 us and o 14 vs 18 us against 128; rank 16 19 vs 21 us
    block_n = min(256, max(16, next_power_of_2(max_out)))
    return LoRATiles(GROUP_TILE_ROWS, block_c, block_k, split_k, block_r, block_n, 4, 4)


def _prefill_tiles(
    r_pad: int,
    max_seg_len: int,
    num_segments: int,
    in_features: int,
    n_targets: int,
    max_out: int,
    num_sms: int,
) -> LoRATiles:
    """tl.dot tiles, every dim >= 16. Shrink: 64 rows x up to 128 columns (every target at
    once when they fit), K split to about one wave (every expand N tile re-reads each
    split's partials, so fewer splits than decode). Expand: 16-32 rows x 128 columns."""
    block_m = min(64, max(16, next_power_of_2(max_seg_len)))
    block_c = min(128, next_power_of_2(n_targets * r_pad))
    block_k = min(64, max(16, next_power_of_2(in_features)))
    programs = num_segments * cdiv(max_seg_len, block_m)
    programs *= cdiv(n_targets * r_pad, block_c)
    split_k = _split_k(programs, 1, 8, in_features, block_k, num_sms)
    shrink_warps = 8 if block_m * block_c >= 8192 else 4
    expand_m = min(block_m, 32 if r_pad >= 64 else 16)
    block_r = min(r_pad, 32)
    block_n = min(128, max(16, next_power_of_2(max_out)))
    return LoRATiles(
        block_m, block_c, block_k, split_k, block_r, block_n, shrink_warps, 4, expand_m
    )


def _check_tiles(tiles: LoRATiles, r_pad: int) -> None:
    sizes = (tiles.block_c, tiles.block_k, tiles.block_r, tiles.block_n)
    rows = (tiles.block_m, tiles.expand_m)
    if any(s & (s - 1) for s in (*rows, *sizes)):
        raise ValueError(f"block sizes must be powers of two: {tiles}")
    if (tiles.block_m == 1) != (tiles.expand_m == 1):
        raise ValueError(f"decode tiles need block_m = expand_block_m = 1: {tiles}")
    if tiles.block_m > 1 and min(*rows, *sizes) < 16:
        raise ValueError(f"tl.dot needs every block size >= 16: {tiles}")
    if tiles.block_r > r_pad or tiles.split_k < 1:
        raise ValueError(f"block_r must be <= {r_pad} and split_k >= 1: {tiles}")
    if tiles.n_group < 1 or (tiles.n_group > 1 and tiles.block_m > 1):
        raise ValueError(f"n_group must be >= 1, and 1 in the prefill form: {tiles}")
    if tiles.dense not in (0, 1) or (tiles.dense and tiles.block_m > 1):
        raise ValueError(f"dense must be 0 or 1, and 0 in the prefill form: {tiles}")
    if tiles.shrink_stages < 0:
        raise ValueError(f"shrink_stages must be >= 0: {tiles}")
    if tiles.fused < 0 or (tiles.fused and (tiles.block_m > 1 or tiles.split_k != 1)):
        raise ValueError(f"fused must be >= 0, and with it block_m and split_k 1: {tiles}")


def _padded_slices(out_slices: Sequence[tuple[int, int]]) -> list[int]:
    """o0, n0, o1, n1, o2, n2 (unused targets repeat the last)."""
    slices = list(out_slices) + [out_slices[-1]] * (MAX_CALL_TARGETS - len(out_slices))
    return [v for o_n in slices for v in o_n]


def _shrink(
    x: Tensor,
    pool: Tensor,
    batch: LoRABatch,
    layer: int,
    first_target: int,
    n_targets: int,
    tiles: LoRATiles,
    v: Tensor | None = None,  # _scratch(); None: made here
) -> Tensor:
    """v [split_k, T, n_targets * R_PAD] fp32: partial x @ A^T of every target."""
    r_pad = _r_pad(batch.max_rank)
    in_features = x.shape[1]
    if v is None:
        v = _scratch(x, batch, n_targets, tiles)
    k_blocks = cdiv(cdiv(in_features, tiles.split_k), tiles.block_k)
    m_tiles = cdiv(batch.max_seg_len, tiles.block_m)
    c_tiles = cdiv(n_targets * r_pad, tiles.block_c)
    grid = (batch.num_segments, m_tiles, c_tiles * tiles.split_k)
    tile_map = _tile_map(batch, tiles, 0)
    if tile_map is not None:
        grid = (_map_programs(batch, tile_map, grid[2], x.device), 1, grid[2])
    args = (
        x,
        v,
        pool,
        batch.seg_start,
        batch.seg_slot,
        batch.row_offsets,
        batch.ranks,
        layer,
        first_target,
        batch.num_layers,
        batch.row_offsets.shape[-1],
        in_features,
        k_blocks,
        tiles.split_k,
        x.stride(0),
        x.stride(1),
        v.stride(0),
        v.stride(1),
    )
    if tiles.block_m == 1:
        _shrink_decode_kernel[grid](
            *args,
            N_TARGETS=n_targets,
            R_PAD=r_pad,
            ROW_ALIGN=batch.row_align,
            BLOCK_C=tiles.block_c,
            BLOCK_K=tiles.block_k,
            DENSE=bool(tiles.dense),
            STAGES=tiles.shrink_stages,
            num_warps=tiles.shrink_warps,
        )
    else:
        _shrink_prefill_kernel[grid](
            *args,
            batch.seg_start if tile_map is None else tile_map,  # (unused without a map)
            batch.seg_start if batch.tile_count is None else batch.tile_count,  # (unused)
            N_TARGETS=n_targets,
            R_PAD=r_pad,
            ROW_ALIGN=batch.row_align,
            BLOCK_M=tiles.block_m,
            BLOCK_C=tiles.block_c,
            BLOCK_K=tiles.block_k,
            DOT_PRECISION=_precision(x),
            TILE_MAP=tile_map is not None,
            PERSISTENT=tile_map is not None and batch.tile_count is not None,
            STAGES=tiles.shrink_stages,
            num_warps=tiles.shrink_warps,
        )
    return v


def _scratch(x: Tensor, batch: LoRABatch, n_targets: int, tiles: LoRATiles) -> Tensor:
    """The shrink's fp32 output [split_k, T, n_targets * R_PAD], on the current stream."""
    width = n_targets * _r_pad(batch.max_rank)
    return torch.empty(tiles.split_k, x.shape[0], width, dtype=torch.float32, device=x.device)


def _expand(
    y: Tensor,
    v: Tensor,
    pool: Tensor,
    batch: LoRABatch,
    layer: int,
    first_target: int,
    out_slices: Sequence[tuple[int, int]],
    tiles: LoRATiles,
) -> None:
    """y[:, slice_t] += scaling_t * (sum of v's partials) @ B^T_t for every target t."""
    n_tiles = cdiv(max(n for _, n in out_slices), tiles.block_n)
    m_tiles = cdiv(batch.max_seg_len, tiles.expand_m)
    n_groups = cdiv(n_tiles, tiles.n_group)  # 1 tile per group in the prefill form
    grid = (batch.num_segments, m_tiles, len(out_slices) * n_groups)
    tile_map = _tile_map(batch, tiles, 1)
    if tile_map is not None:
        grid = (_map_programs(batch, tile_map, grid[2], y.device), 1, grid[2])
    args = (
        y,
        v,
        pool,
        batch.seg_start,
        batch.seg_slot,
        batch.row_offsets,
        batch.ranks,
        batch.scalings,
        layer,
        first_target,
        batch.num_layers,
        batch.row_offsets.shape[-1],
        n_tiles,
        tiles.split_k,
        *_padded_slices(out_slices),
        y.stride(0),
        y.stride(1),
        v.stride(0),
        v.stride(1),
    )
    r_pad = _r_pad(batch.max_rank)
    if tiles.block_m == 1:
        _expand_decode_kernel[grid](
            *args,
            tiles.n_group,
            R_PAD=r_pad,
            ROW_ALIGN=batch.row_align,
            BLOCK_S=next_power_of_2(tiles.split_k),
            BLOCK_R=tiles.block_r,
            BLOCK_N=tiles.block_n,
            RANK_PACK=bool(tiles.rank_pack),
            num_warps=tiles.expand_warps,
        )
    else:
        _expand_prefill_kernel[grid](
            *args,
            batch.seg_start if tile_map is None else tile_map,  # (unused without a map)
            batch.seg_start if batch.tile_count is None else batch.tile_count,  # (unused)
            R_PAD=r_pad,
            ROW_ALIGN=batch.row_align,
            BLOCK_M=tiles.expand_m,
            BLOCK_R=tiles.block_r,
            BLOCK_N=tiles.block_n,
            DOT_PRECISION=_precision(y),
            TILE_MAP=tile_map is not None,
            PERSISTENT=tile_map is not None and batch.tile_count is not None,
            num_warps=tiles.expand_warps,
        )


def _fused(
    x: Tensor,
    y: Tensor,
    pool: Tensor,
    batch: LoRABatch,
    layer: int,
    first_target: int,
    out_slices: Sequence[tuple[int, int]],
    tiles: LoRATiles,
) -> None:
    """y[:, slice_t] += scaling_t * (x @ A_t^T) @ B_t^T in one launch (decode form)."""
    grid = (batch.num_segments, len(out_slices) * tiles.fused)
    _fused_decode_kernel[grid](
        x,
        y,
        pool,
        batch.seg_start,
        batch.seg_slot,
        batch.row_offsets,
        batch.ranks,
        batch.scalings,
        layer,
        first_target,
        batch.num_layers,
        batch.row_offsets.shape[-1],
        x.shape[1],
        tiles.fused,
        *_padded_slices(out_slices),
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        ROW_ALIGN=batch.row_align,
        BLOCK_R=tiles.block_r,
        BLOCK_K=tiles.block_k,
        BLOCK_N=tiles.block_n,
        STAGES=tiles.shrink_stages,
        RANK_CLASSES=fused_rank_classes(tiles.block_r),
        num_warps=tiles.shrink_warps,
    )


def _tile_map(batch: LoRABatch, tiles: LoRATiles, which: int) -> Tensor | None:
    """The batch's (segment, row tile) map for the shrink (0) or the expand (1), if it has
    one; it must have been built for these tiles' rows."""
    if batch.tile_maps is None or tiles.block_m == 1:
        return None
    rows = (tiles.block_m, tiles.expand_m)[which]
    if batch.tile_rows[which] != rows:
        raise ValueError(
            f"the batch's tile map is for {batch.tile_rows[which]}-row tiles, these tiles "
            f"have {rows}: build it with lora_tile_rows()"
        )
    return batch.tile_maps[which]


def _map_programs(batch: LoRABatch, tile_map: Tensor, other: int, device: torch.device) -> int:
    """Axis 0 of a grid over a tile map: one program per entry, or with a live count
    (persistent) about _PERSISTENT_PROGRAMS_PER_SM programs per SM over all axes."""
    entries = tile_map.shape[0]
    if batch.tile_count is None:
        return entries
    want = cdiv(_PERSISTENT_PROGRAMS_PER_SM * _num_sms(device), other)
    return max(1, min(entries, want))


def lora_tile_rows(max_rank: int, max_seg_len: int, num_segments: int) -> tuple[int, int]:
    """(shrink, expand) rows per program of the prefill-form tiles for such a batch: what a
    tile map must be built for. The same for every layer (they depend on no shape of it)."""
    tiles = _pick_tiles(max_rank, max_seg_len, num_segments, 64, 1, 64, 1)
    return tiles.block_m, tiles.expand_m


def _precision(t: Tensor) -> str:
    """fp32 models get exact fp32 dots; 16-bit ones tf32 for the fp32 expand operands."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def lora_apply_triton(
    x: Tensor,  # [T, in_features]
    y: Tensor,  # [T, out_total], updated in place (may be a strided view)
    pool: Tensor,  # [P] the page pool viewed flat
    batch: LoRABatch,
    layer: int,
    first_target: int,
    out_slices: Sequence[tuple[int, int]],  # per target (output column offset, width)
    tiles: LoRATiles | None = None,  # None: pick_tiles
) -> None:
    """Shrink then expand, two launches (one with fused tiles), no device sync (CUDA-graph
    safe)."""
    if batch.num_segments == 0:
        return
    shrink, expand = lora_triton_launches(x, pool, batch, layer, first_target, out_slices, tiles)
    shrink()
    expand(y)  # (checks y against x and the slices)


def lora_triton_launches(
    x: Tensor,  # [T, in_features]
    pool: Tensor,  # [P] the page pool viewed flat
    batch: LoRABatch,  # with segments
    layer: int,
    first_target: int,
    out_slices: Sequence[tuple[int, int]],  # per target (output column offset, width)
    tiles: LoRATiles | None = None,  # None: pick_tiles
) -> tuple[Callable[[], None], Callable[[Tensor], None]]:
    """lora_apply_triton's two launches apart: (shrink(), expand(y)). The fp32 scratch
    between them is made now, on the current stream, so the caller may launch the shrink on
    another stream (beside the base GEMM that makes y) and the expand back on this one after
    waiting for it: the scratch is then freed on the stream that made it."""
    _check_inputs(x, pool, first_target, out_slices)
    n_targets = len(out_slices)
    if tiles is None:
        max_out = max(n for _, n in out_slices)
        tiles = pick_tiles(batch, x.shape[1], n_targets, max_out, _num_sms(x.device))
    if tiles.block_m == 1 and batch.max_seg_len > 1:
        raise ValueError("decode tiles (block_m=1) need max_seg_len == 1")
    _check_tiles(tiles, _r_pad(batch.max_rank))
    if tiles.fused:
        if tiles.block_r < batch.max_rank:
            raise ValueError(f"fused tiles need block_r >= max_rank={batch.max_rank}: {tiles}")

        def fused(y: Tensor) -> None:
            _check_output(x, y, out_slices)
            _fused(x, y, pool, batch, layer, first_target, out_slices, tiles)

        return lambda: None, fused  # one launch, which needs y: nothing to run apart
    v = _scratch(x, batch, n_targets, tiles)

    def shrink() -> None:
        _shrink(x, pool, batch, layer, first_target, n_targets, tiles, v)

    def expand(y: Tensor) -> None:
        _check_output(x, y, out_slices)
        _expand(y, v, pool, batch, layer, first_target, out_slices, tiles)

    return shrink, expand


def lora_apply(
    x: Tensor,  # [T, in_features]
    y: Tensor,  # [T, out_total], updated in place (may be a strided view)
    pool: Tensor,  # [P] the page pool viewed flat
    batch: LoRABatch,
    layer: int,
    first_target: int,
    out_slices: Sequence[tuple[int, int]],  # per target (output column offset, width)
    backend: str = "auto",  # "auto": triton on CUDA, torch elsewhere; "torch" | "triton" | "bmm"
) -> None:
    """In place, for each token row i in a segment with slot a and each target k whose rank
    r = ranks[a, layer, first_target + k] > 0:

        y[i, o_k : o_k + n_k] += scalings[a, layer, t] * (x[i] @ A^T) @ B^T

    A = the r A rows (width in_features), B^T = the r B^T rows (width n_k). Rows outside
    every segment are not touched.
    """
    if batch.num_segments == 0:
        return
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    args = (x, y, pool, batch, layer, first_target, out_slices)
    if backend == "torch":
        lora_apply_ref(*args)
    elif backend == "triton":
        lora_apply_triton(*args)
    elif backend == "bmm":
        lora_apply_bmm(*args)
    else:
        raise ValueError(f"unknown lora backend {backend!r}")
