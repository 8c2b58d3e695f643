"""Batched multi-LoRA: reference vs dense math, Triton kernels vs reference.

Each case packs random adapters into a NaN-filled flat pool as scattered rows (shuffled
order, random gaps, neighbouring rows of one adapter in unrelated pages); table entries
past a rank point at a NaN page. A kernel that reads a row it should not reads NaN into
its output. The expected output is computed densely in float64 from the original A and B
(as rounded to the pool dtype), so the reference itself is checked against plain math.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from loraserve.config import LORA_TARGETS
from loraserve.kernels.lora import (
    LoRABatch,
    LoRATiles,
    lora_apply,
    lora_apply_ref,
    lora_apply_triton,
    pick_tiles,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_LAYERS = 2
LAYER = 1
PAGE_ELEMS = 512
HIDDEN, Q, KV, INTER = 72, 48, 24, 40  # widths are not powers of two

# (in_features, out_features) of each target, indexed like LORA_TARGETS
WIDTHS = [(HIDDEN, Q), (HIDDEN, KV), (HIDDEN, KV), (Q, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER)]
WIDTHS.append((INTER, HIDDEN))

# the model's packed linear calls: name -> (first_target, out_slices)
CALLS = {
    "qkv": (0, [(0, Q), (Q, KV), (Q + KV, KV)]),
    "o": (3, [(0, HIDDEN)]),
    "gate_up": (4, [(0, INTER), (INTER, INTER)]),
    "down": (6, [(0, HIDDEN)]),
}

# slot -> rank of each target at LAYER (q, k, v, o, gate, up, down); 0 = not targeted
MIXED_RANKS = {
    0: [8, 8, 0, 8, 8, 8, 0],
    1: [1] * 7,
    2: [128, 64, 16, 128, 2, 0, 64],
    3: [2, 2, 2, 2, 2, 2, 2],
    4: [0, 16, 16, 16, 0, 16, 16],
    5: [64, 1, 128, 64, 64, 2, 128],
    6: [0] * 7,  # the adapter does not touch this layer
    7: [16] * 7,  # in the tables, used by no segment
}
SMALL_RANKS = {
    0: [1, 2, 0, 1, 2, 1, 2],
    1: [8, 0, 2, 8, 1, 8, 0],
    2: [2] * 7,
    3: [0, 1, 8, 2, 0, 2, 1],
}

# (slot, rows); slot None = base-only rows (see _segments_of)
DECODE = [(None, 1), (0, 1), (None, 1), (1, 1), (2, 1), (None, 2), (0, 1), (3, 1), (4, 1)]
DECODE += [(5, 1), (6, 1), (None, 2)]
PREFILL = [(0, 17), (None, 3), (1, 1), (2, 40), (0, 3), (None, 2), (3, 1), (4, 17), (6, 3)]
PREFILL += [(None, 4)]
SMALL_DECODE = [(0, 1), (1, 1), (None, 1), (2, 1), (3, 1), (0, 1)]
SMALL_PREFILL = [(None, 2), (0, 3), (1, 17), (2, 1), (None, 1), (3, 40), (1, 1)]


@dataclass
class Case:
    x: Tensor  # [T, in_features]
    y: Tensor  # [T, out_total]
    pool: Tensor  # [P]
    batch: LoRABatch
    first_target: int
    out_slices: list[tuple[int, int]]
    expected: Tensor  # float64 [T, out_total]
    base_rows: Tensor  # bool [T]: rows that must stay bit-identical

    def args(self) -> tuple:
        return (self.x, self.y, self.pool, self.batch, LAYER, self.first_target, self.out_slices)


def _random_ranks(g: torch.Generator) -> list[int]:
    return torch.randint(0, 20, (len(LORA_TARGETS),), generator=g).tolist()


def _place_rows(widths: list[int], align: int, g: torch.Generator) -> tuple[list[int], int]:
    """A start offset for each row: shuffled, random gaps, pages in random order, every
    offset a multiple of ``align``.

    Page 0 stays NaN (the target of unused table entries). Returns offsets, num_pages.
    """
    order = torch.randperm(len(widths), generator=g).tolist()
    pages = (1 + torch.randperm(len(widths) + 1, generator=g)).tolist()
    offsets = [0] * len(widths)
    page_i, cursor = 0, 0
    for row in order:
        cursor += int(torch.randint(0, 9, (1,), generator=g))
        if cursor + widths[row] > PAGE_ELEMS:
            page_i, cursor = page_i + 1, int(torch.randint(0, 9, (1,), generator=g))
        cursor = -(-cursor // align) * align
        offsets[row] = pages[page_i] * PAGE_ELEMS + cursor
        cursor += widths[row]
    return offsets, len(widths) + 2


def _pack(
    weights: dict[tuple[int, int, int], tuple[Tensor, Tensor]],
    num_slots: int,
    table_rank: int,
    dtype: torch.dtype,
    align: int,
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Pool [P] (NaN where no row is) and row_offsets int64 [slots, layers, 7, 2, table_rank]."""
    rows: list[Tensor] = []  # each [width], in pool dtype
    where: list[tuple[int, int, int, int, int]] = []  # (slot, layer, target, a|b, j)
    for (slot, layer, t), (a, b) in weights.items():
        for j in range(a.shape[0]):
            rows += [a[j], b[:, j]]
            where += [(slot, layer, t, 0, j), (slot, layer, t, 1, j)]
    offsets, num_pages = _place_rows([r.shape[0] for r in rows], align, g)
    pool = torch.full((num_pages * PAGE_ELEMS,), float("nan"), dtype=dtype)
    table = torch.zeros(num_slots, NUM_LAYERS, len(LORA_TARGETS), 2, table_rank, dtype=torch.int64)
    table += int(torch.randint(0, PAGE_ELEMS // 2, (1,), generator=g))  # inside NaN page 0
    for row, off, idx in zip(rows, offsets, where, strict=True):
        pool[off : off + row.shape[0]] = row
        table[idx] = off
    return pool, table


def _weights(
    ranks: dict[int, list[int]], dtype: torch.dtype, g: torch.Generator
) -> tuple[dict, Tensor, Tensor]:
    """Random A [r, in] and B [out, r] per (slot, layer, target), ranks and scalings tables."""
    num_slots = max(ranks) + 1
    rank_t = torch.zeros(num_slots, NUM_LAYERS, len(LORA_TARGETS), dtype=torch.int32)
    for slot, per_target in ranks.items():
        rank_t[slot, LAYER] = torch.tensor(per_target, dtype=torch.int32)
        rank_t[slot, 1 - LAYER] = torch.tensor(_random_ranks(g), dtype=torch.int32)
    scalings = 0.5 + 1.5 * torch.rand(rank_t.shape, generator=g)
    weights = {}
    for slot, layer, t in rank_t.nonzero().tolist():
        r = int(rank_t[slot, layer, t])
        n_in, n_out = WIDTHS[t]
        a = torch.randn(r, n_in, generator=g) / n_in**0.5
        b = torch.randn(n_out, r, generator=g) / r**0.5
        weights[(slot, layer, t)] = (a.to(dtype), b.to(dtype))
    return weights, rank_t, scalings


def _segments_of(spec: list[tuple[int | None, int]]) -> tuple[list[tuple[int, int, int]], int]:
    """(first row, rows, slot) of each segment, and the total rows.

    Base-only rows (slot None) before the first and after the last LoRA segment belong to
    no segment; between two LoRA segments they form a segment of slot -1.
    """
    lora = [i for i, (slot, _) in enumerate(spec) if slot is not None]
    segs, row = [], 0
    for i, (slot, n) in enumerate(spec):
        if slot is not None or (lora and lora[0] < i < lora[-1]):
            segs.append((row, n, -1 if slot is None else slot))
        row += n
    return segs, row


def _dense(
    x: Tensor, y: Tensor, weights: dict, scalings: Tensor, segs: list, call: tuple
) -> Tensor:
    """float64 [T, out_total]: y + every segment row's delta, from the original A and B."""
    first_target, out_slices = call
    out = y.double().clone()
    for start, n, slot in segs:
        if slot < 0:
            continue
        xs = x[start : start + n].double()
        for k, (o, width) in enumerate(out_slices):
            key = (slot, LAYER, first_target + k)
            if key in weights:
                a, b = (w.double() for w in weights[key])
                out[start : start + n, o : o + width] += float(scalings[key]) * (xs @ a.T @ b.T)
    return out


def make_case(
    spec: list[tuple[int | None, int]],
    call: str,
    dtype: torch.dtype,
    ranks: dict[int, list[int]] = MIXED_RANKS,
    seed: int = 0,
    extra_rank: int = 0,
    row_align: int = 1,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    first_target, out_slices = CALLS[call]
    weights, rank_t, scalings = _weights(ranks, dtype, g)
    max_rank = int(rank_t.max()) + extra_rank
    pool, table = _pack(weights, rank_t.shape[0], max_rank + 3, dtype, row_align, g)
    segs, total = _segments_of(spec)
    in_features = WIDTHS[first_target][0]
    out_total = sum(n for _, n in out_slices)
    x = torch.randn(total, in_features, generator=g).to(dtype)
    y = torch.randn(total, out_total, generator=g).to(dtype)
    seg_start = [s for s, _, _ in segs] + ([segs[-1][0] + segs[-1][1]] if segs else [0])
    base_rows = torch.ones(total, dtype=torch.bool)
    for start, n, slot in segs:
        if slot < 0:
            continue
        targeted = any(rank_t[slot, LAYER, first_target + k] > 0 for k in range(len(out_slices)))
        base_rows[start : start + n] = not targeted
    batch = LoRABatch(
        seg_start=torch.tensor(seg_start, dtype=torch.int32, device=DEVICE),
        seg_slot=torch.tensor([s for _, _, s in segs], dtype=torch.int32, device=DEVICE),
        row_offsets=table.to(DEVICE),
        ranks=rank_t.to(DEVICE),
        scalings=scalings.to(DEVICE),
        max_rank=max_rank,
        max_seg_len=max((n for _, n, slot in segs if slot >= 0), default=1),
        num_segments=len(segs),
        row_align=row_align,
    )
    expected = _dense(x, y, weights, scalings, segs, (first_target, out_slices))
    return Case(
        x=x.to(DEVICE),
        y=y.to(DEVICE),
        pool=pool.to(DEVICE),
        batch=batch,
        first_target=first_target,
        out_slices=out_slices,
        expected=expected.to(DEVICE),
        base_rows=base_rows.to(DEVICE),
    )


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
SPECS = {
    "decode": (DECODE, MIXED_RANKS),
    "prefill": (PREFILL, MIXED_RANKS),
    "small_decode": (SMALL_DECODE, SMALL_RANKS),
    "small_prefill": (SMALL_PREFILL, SMALL_RANKS),
}


def _run(case: Case, apply) -> Tensor:
    """Apply to a copy of y; check untouched rows bit-identical; return the result."""
    y0 = case.y.clone()
    apply(case.x, case.y, case.pool, case.batch, LAYER, case.first_target, case.out_slices)
    assert torch.equal(case.y[case.base_rows], y0[case.base_rows]), "a base-only row changed"
    assert torch.isfinite(case.y).all()
    out, case.y = case.y, y0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("spec", SPECS)
def test_reference_matches_dense(spec: str, call: str, dtype: torch.dtype) -> None:
    segments, ranks = SPECS[spec]
    case = make_case(segments, call, dtype, ranks, seed=1)
    got = _run(case, lora_apply_ref)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), case.expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("spec", SPECS)
def test_triton_matches_reference(spec: str, call: str, dtype: torch.dtype) -> None:
    segments, ranks = SPECS[spec]
    case = make_case(segments, call, dtype, ranks, seed=2)
    got = _run(case, lora_apply_triton)
    want = _run(case, lora_apply_ref)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got.double(), case.expected, **TOL[dtype])


# explicit tiles: several K steps and splits, column tiles inside one target and across
# targets, max_rank above every rank (extra_rank)
TILES = {
    "decode_split": (DECODE, MIXED_RANKS, 0, LoRATiles(1, 32, 16, 3, 16, 32)),
    "decode_wide": (SMALL_DECODE, SMALL_RANKS, 5, LoRATiles(1, 64, 32, 2, 8, 32)),
    # 3 output tiles per expand program: groups that end inside a target and past its end
    "decode_grouped": (DECODE, MIXED_RANKS, 0, LoRATiles(1, 32, 16, 2, 16, 16, n_group=3)),
    # each segment's live A rows packed into the columns, across targets and column tiles
    # the whole rank in one expand step (R_PAD <= BLOCK_R), 2 output tiles per program
    "decode_one_pass": (SMALL_DECODE, SMALL_RANKS, 0, LoRATiles(1, 16, 16, 2, 16, 16, n_group=2)),
    "decode_dense": (DECODE, MIXED_RANKS, 0, LoRATiles(1, 16, 16, 2, 16, 32, dense=1)),
    "decode_dense_wide": (SMALL_DECODE, SMALL_RANKS, 5, LoRATiles(1, 64, 32, 1, 8, 32, dense=1)),
    # small ranks' B^T rows of several output tiles in one load (rank_pack): 8 tiles of a
    # rank <= 16 row per [128, 16] load, groups that end inside a target and past its end
    "decode_rank_pack": (
        DECODE,
        MIXED_RANKS,
        0,
        LoRATiles(1, 32, 16, 2, 128, 16, n_group=3, rank_pack=1),
    ),
    "decode_rank_pack_small": (
        SMALL_DECODE,
        SMALL_RANKS,
        5,
        LoRATiles(1, 16, 16, 1, 32, 8, n_group=2, rank_pack=1),
    ),
    # the H200 decode defaults (session 9): K and N blocks wider than the layer (masked),
    # the whole rank in one step, 8 output tiles per program
    "decode_wide_blocks": (
        DECODE,
        MIXED_RANKS,
        0,
        LoRATiles(1, 16, 512, 1, 64, 512, 2, 2, n_group=8),
    ),
    # ... and for ranks <= 16: dense shrink columns with the rank-packed expand, 16-wide
    # N tiles so a program's 4 tiles cross a target's end (Q = 48)
    "decode_small_defaults": (
        SMALL_DECODE,
        SMALL_RANKS,
        0,
        LoRATiles(1, 16, 512, 2, 16, 16, 2, 2, n_group=4, dense=1, rank_pack=1),
    ),
    # the shrink's K loop as tl.range(num_stages=3): several K steps and a split
    "decode_shrink_stages": (
        DECODE,
        MIXED_RANKS,
        0,
        LoRATiles(1, 16, 16, 2, 16, 32, n_group=2, shrink_stages=3),
    ),
    "prefill_split": (PREFILL, MIXED_RANKS, 0, LoRATiles(16, 32, 16, 3, 32, 32, 4, 4, 32)),
    # ... with the shrink's K loop pipelined (tl.range(num_stages=2)) over several K steps
    "prefill_shrink_stages": (
        PREFILL,
        MIXED_RANKS,
        0,
        LoRATiles(16, 32, 16, 3, 32, 32, 4, 4, 32, shrink_stages=2),
    ),
    "prefill_wide": (SMALL_PREFILL, SMALL_RANKS, 5, LoRATiles(32, 64, 32, 2, 16, 32, 4, 4, 16)),
}


@pytest.mark.parametrize("call", ["qkv", "down"])
@pytest.mark.parametrize("name", TILES)
def test_triton_tiles(name: str, call: str) -> None:
    segments, ranks, extra_rank, tiles = TILES[name]
    case = make_case(segments, call, torch.float32, ranks, seed=3, extra_rank=extra_rank)
    got = _run(case, lambda *a: lora_apply_triton(*a, tiles=tiles))
    torch.testing.assert_close(got.double(), case.expected, **TOL[torch.float32])


@pytest.mark.parametrize("spec", ["decode", "prefill"])
def test_triton_with_gpu_tiles(spec: str) -> None:
    """The tiles pick_tiles gives a 132-SM GPU (split K) also compute the right thing."""
    segments, ranks = SPECS[spec]
    case = make_case(segments, "gate_up", torch.float32, ranks, seed=4)
    tiles = pick_tiles(case.batch, HIDDEN, 2, INTER, num_sms=132)
    got = _run(case, lambda *a: lora_apply_triton(*a, tiles=tiles))
    torch.testing.assert_close(got.double(), case.expected, **TOL[torch.float32])


@pytest.mark.parametrize("spec", ["decode", "prefill"])
def test_triton_aligned_rows(spec: str) -> None:
    """Row offsets promised to be multiples of 8 elements (the kernels' wide-load hint)."""
    segments, ranks = SPECS[spec]
    case = make_case(segments, "qkv", torch.float16, ranks, seed=9, row_align=8)
    b = case.batch
    live = torch.arange(b.row_offsets.shape[-1], device=DEVICE) < b.ranks[..., None, None]
    assert (b.row_offsets[live.expand_as(b.row_offsets)] % 8 == 0).all()
    got = _run(case, lora_apply_triton)
    torch.testing.assert_close(got.double(), case.expected, **TOL[torch.float16])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_y(backend: str) -> None:
    """y as a column slice of a bigger tensor: only its segment rows change."""
    case = make_case(PREFILL, "qkv", torch.float32, seed=5)
    big = torch.randn(case.y.shape[0], case.y.shape[1] + 11, device=DEVICE)
    big[:, 5 : 5 + case.y.shape[1]] = case.y
    before = big.clone()
    view = big[:, 5 : 5 + case.y.shape[1]]
    lora_apply(case.x, view, case.pool, case.batch, LAYER, 0, case.out_slices, backend=backend)
    torch.testing.assert_close(view.double(), case.expected, **TOL[torch.float32])
    assert torch.equal(big[:, :5], before[:, :5]) and torch.equal(big[:, -6:], before[:, -6:])
    assert torch.equal(big[case.base_rows], before[case.base_rows])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_segments_is_a_noop(backend: str) -> None:
    case = make_case([(None, 4)], "o", torch.float32, seed=6)
    assert case.batch.num_segments == 0
    y0 = case.y.clone()
    lora_apply(*case.args(), backend=backend)
    assert torch.equal(case.y, y0)


def test_dispatch_picks_backend() -> None:
    case = make_case(DECODE, "o", torch.float32, seed=7)
    ref = _run(case, lora_apply_ref)
    on_torch = _run(case, lambda *a: lora_apply(*a, backend="torch"))
    on_triton = _run(case, lambda *a: lora_apply(*a, backend="triton"))
    auto = _run(case, lora_apply)
    assert torch.equal(on_torch, ref)
    torch.testing.assert_close(on_triton, ref, **TOL[torch.float32])
    assert torch.equal(auto, on_triton if DEVICE.type == "cuda" else ref)
    with pytest.raises(ValueError, match="unknown lora backend"):
        lora_apply(*case.args(), backend="cuda")


def test_pick_tiles() -> None:
    decode = make_case(SMALL_DECODE, "qkv", torch.float32, SMALL_RANKS).batch
    prefill = make_case(SMALL_PREFILL, "qkv", torch.float32, SMALL_RANKS).batch
    d = pick_tiles(decode, 4096, 3, 4096, num_sms=132)
    p = pick_tiles(prefill, 4096, 3, 4096, num_sms=132)
    assert d.block_m == 1 and d.split_k > 1
    wide = pick_tiles(make_case(DECODE * 64, "qkv", torch.float32).batch, 4096, 3, 4096, 132)
    assert wide.n_group > 1  # a big decode batch: several output tiles per expand program
    assert (wide.block_k, wide.block_n) == (512, 512)  # session 9's sweep
    assert not (wide.dense or wide.rank_pack)  # ranks up to 128 in the batch
    small_batch = make_case(SMALL_DECODE * 64, "qkv", torch.float32, SMALL_RANKS).batch
    small = pick_tiles(dataclasses.replace(small_batch, max_rank=8), 4096, 3, 4096, 132)
    assert small.dense and small.rank_pack and small.n_group > 1  # ranks <= 16: packed
    assert d.block_n != 256  # narrowing for a small grid skips 256 columns (slow on an H200)
    assert min(p.block_m, p.block_c, p.block_k, p.block_r, p.block_n) >= 16  # tl.dot's minimum
    assert p.block_c >= 3 * 16  # all three targets' columns in one tile: x is read once


def test_bad_inputs_raise() -> None:
    case = make_case(PREFILL, "qkv", torch.float32, seed=8)
    b = case.batch
    with pytest.raises(ValueError, match="ranks"):
        LoRABatch(
            b.seg_start,
            b.seg_slot,
            b.row_offsets,
            b.ranks.long(),
            b.scalings,
            8,
            40,
            b.num_segments,
        )
    with pytest.raises(ValueError, match="max_rank"):
        LoRABatch(
            b.seg_start, b.seg_slot, b.row_offsets, b.ranks, b.scalings, 999, 40, b.num_segments
        )
    with pytest.raises(ValueError, match="targets"):
        lora_apply_ref(case.x, case.y, case.pool, b, LAYER, 5, case.out_slices)
    with pytest.raises(ValueError, match="dtype"):
        lora_apply_triton(case.x, case.y, case.pool.half(), b, LAYER, 0, case.out_slices)
    with pytest.raises(ValueError, match="dot"):
        lora_apply_triton(*case.args(), tiles=LoRATiles(16, 16, 8, 1, 16, 16))
    with pytest.raises(ValueError, match="decode"):
        lora_apply_triton(*case.args(), tiles=LoRATiles(16, 16, 16, 1, 16, 16, 4, 4, 1))
    with pytest.raises(ValueError, match="dense"):
        lora_apply_triton(*case.args(), tiles=LoRATiles(16, 16, 16, 1, 16, 16, dense=1))
    with pytest.raises(ValueError, match="n_group"):
        lora_apply_triton(*case.args(), tiles=LoRATiles(16, 16, 16, 1, 16, 16, n_group=2))
    with pytest.raises(ValueError, match="shrink_stages"):
        lora_apply_triton(*case.args(), tiles=LoRATiles(16, 16, 16, 1, 16, 16, shrink_stages=-1))


def _tile_map(batch: LoRABatch, rows: int, pad: int) -> Tensor:
    """(segment, row tile) of every segment with an adapter, then ``pad`` entries of -1."""
    starts = batch.seg_start.tolist()
    entries = []
    for s, slot in enumerate(batch.seg_slot.tolist()):
        if slot >= 0:
            n = starts[s + 1] - starts[s]
            entries += [(s, m) for m in range(-(-n // rows))]
    entries += [(-1, -1)] * pad
    return torch.tensor(entries, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("call", ["qkv", "o"])
@pytest.mark.parametrize("spec", ["prefill", "small_prefill"])
def test_triton_tile_maps_match_the_full_grid(spec: str, call: str) -> None:
    """Padded CUDA graphs run the prefill kernels over a host-built (segment, row tile) map
    instead of segments x the longest segment's tiles: the same result, and a map for other
    tile rows is refused."""
    from loraserve.kernels.lora import lora_tile_rows

    segments, ranks = SPECS[spec]
    case = make_case(segments, call, torch.float32, ranks, seed=5)
    want = _run(case, lora_apply_triton)
    b = case.batch
    rows = lora_tile_rows(b.max_rank, b.max_seg_len, b.num_segments)
    b.tile_maps = (_tile_map(b, rows[0], 3), _tile_map(b, rows[1], 5))
    b.tile_rows = rows
    got = _run(case, lora_apply_triton)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    b.tile_rows = (rows[0] * 2, rows[1])
    with pytest.raises(ValueError, match="tile map"):
        _run(case, lora_apply_triton)


# A decode batch grouped by adapter (engine/graphs.py sorts rows): one segment per adapter,
# some with more rows than one 16-row tile
GROUPED = [(None, 2), (0, 3), (1, 1), (2, 20), (3, 1), (4, 5), (5, 17), (6, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("call", ["qkv", "o", "down"])
def test_triton_grouped_decode_persistent(call: str, dtype: torch.dtype) -> None:
    """Grouped decode rows with a live-entry count: the persistent grids visit exactly the
    first ``tile_count`` map entries (the padding after them repeats live entries, which
    would add their deltas twice if read), each program several of them."""
    from loraserve.kernels.lora import GROUP_TILE_ROWS

    case = make_case(GROUPED, call, dtype, MIXED_RANKS, seed=6)
    b = case.batch
    b.grouped_rows = case.x.shape[0]
    live = _tile_map(b, GROUP_TILE_ROWS, 0)
    tile_map = torch.cat([live, live[:4]]).contiguous()
    b.tile_maps = (tile_map, tile_map)
    b.tile_rows = (GROUP_TILE_ROWS, GROUP_TILE_ROWS)
    b.tile_count = torch.tensor([live.shape[0]], dtype=torch.int32, device=DEVICE)
    tiles = pick_tiles(b, case.x.shape[1], len(case.out_slices), max(Q, HIDDEN), num_sms=132)
    assert (tiles.block_m, tiles.expand_m) == (GROUP_TILE_ROWS, GROUP_TILE_ROWS)
    got = _run(case, lora_apply_triton)
    torch.testing.assert_close(got.double(), case.expected, **TOL[dtype])
    # the shrink's input features split over 5 programs, as the H200's small grouped grids
    # split them (up to 8; _grouped_tiles): the expand adds the partial sums
    split = tiles._replace(block_k=16, split_k=5)
    got = _run(case, lambda *a: lora_apply_triton(*a, tiles=split))
    torch.testing.assert_close(got.double(), case.expected, **TOL[dtype])
    with pytest.raises(ValueError, match="tile_count"):
        LoRABatch(**{**vars(b), "tile_maps": None})


# Fused decode (LoRATiles.fused): shrink and expand in one launch, a program per (row,
# target, share of its output tiles). Ranks up to 128 in 16-wide K and N blocks: several K
# steps, tiles that end inside a target and past its end; 1 or 3 programs per (row, target).
FUSED_TILES = {
    "one_part": LoRATiles(1, 16, 16, 1, 128, 16, fused=1),
    "three_parts": LoRATiles(1, 16, 16, 1, 128, 16, fused=3),
    "stages": LoRATiles(1, 16, 16, 1, 128, 32, fused=2, shrink_stages=3),
    "wide_blocks": LoRATiles(1, 16, 512, 1, 128, 512, fused=1),  # one masked step each
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("name", FUSED_TILES)
def test_triton_fused_decode(name: str, call: str, dtype: torch.dtype) -> None:
    case = make_case(DECODE, call, dtype, MIXED_RANKS, seed=11)
    tiles = FUSED_TILES[name]
    got = _run(case, lambda *a: lora_apply_triton(*a, tiles=tiles))
    torch.testing.assert_close(got.double(), case.expected, **TOL[dtype])


def test_fused_decode_picked_and_checked() -> None:
    """LoRABatch.fused_decode: pick_tiles gives fused tiles to decode batches (the whole
    rank per step, the output split where the grid is small), which compute the delta in a
    strided y; tiles that cannot hold the rank, or split K, are refused."""
    case = make_case(SMALL_DECODE, "qkv", torch.float32, SMALL_RANKS, seed=12)
    # max_rank 8: the ranks of LAYER (the other layer's, random up to 19, are not read)
    case.batch = dataclasses.replace(case.batch, fused_decode=True, max_rank=8)
    tiles = pick_tiles(case.batch, 4096, 3, 4096, num_sms=132)  # a 7B layer's q|k|v on an H200
    assert tiles.fused > 1 and tiles.block_r >= case.batch.max_rank and tiles.split_k == 1
    big = torch.randn(case.y.shape[0], case.y.shape[1] + 7, device=DEVICE)
    view = big[:, 3 : 3 + case.y.shape[1]]
    view.copy_(case.y)
    before = big.clone()
    lora_apply_triton(case.x, view, case.pool, case.batch, LAYER, 0, case.out_slices, tiles)
    torch.testing.assert_close(view.double(), case.expected, **TOL[torch.float32])
    assert torch.equal(big[:, :3], before[:, :3]) and torch.equal(big[:, -4:], before[:, -4:])
    on_cpu_grid = _run(case, lora_apply_triton)  # pick_tiles for this device
    torch.testing.assert_close(on_cpu_grid.double(), case.expected, **TOL[torch.float32])
    prefill = make_case(SMALL_PREFILL, "qkv", torch.float32, SMALL_RANKS).batch
    prefill = dataclasses.replace(prefill, fused_decode=True)
    assert pick_tiles(prefill, HIDDEN, 3, Q, num_sms=132).fused == 0  # prompts: two launches
    rank_20 = dataclasses.replace(case.batch, max_rank=20)  # fused lost at large ranks
    assert pick_tiles(rank_20, 4096, 3, 4096, num_sms=132).fused == 0
    with pytest.raises(ValueError, match="block_r >= max_rank"):
        lora_apply_triton(*case.args(), tiles=tiles._replace(block_r=4))
    with pytest.raises(ValueError, match="split_k 1"):
        lora_apply_triton(*case.args(), tiles=tiles._replace(split_k=2))
