"""The "bmm" LoRA backend (S-LoRA's padded ablation) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from loraserve.config import LORA_TARGETS
from loraserve.kernels.lora import LoRABatch, lora_apply, lora_apply_bmm, lora_apply_ref

LAYERS, LAYER = 2, 1
H, Q, KV, I = 40, 24, 12, 56  # noqa: E741 - hidden, q, kv, intermediate (not powers of two)
SHAPES = {  # target -> (in, out)
    "q_proj": (H, Q),
    "k_proj": (H, KV),
    "v_proj": (H, KV),
    "o_proj": (Q, H),
    "gate_proj": (H, I),
    "up_proj": (H, I),
    "down_proj": (I, H),
}
CALLS = {"qkv": (0, [(0, Q), (Q, KV), (Q + KV, KV)]), "down": (6, [(0, H)])}
# slot -> rank of every target (0: not adapted); mixed ranks, one adapter without layer 1
RANKS = {0: [8, 8, 0, 8, 8, 8, 8], 1: [1, 3, 5, 2, 1, 1, 7], 2: [0] * 7, 3: [16] * 7}


def _pool_and_tables(g: torch.Generator, table_rank: int):
    """A flat pool (NaN where no row lies, so a stray read shows) with every row of every
    adapter at a scattered offset, and the tables pointing at them."""
    shape = (len(RANKS), LAYERS, len(LORA_TARGETS))
    ranks = torch.zeros(shape, dtype=torch.int32)
    for slot, per_target in RANKS.items():
        ranks[slot, :] = torch.tensor(per_target, dtype=torch.int32)
    offsets = torch.zeros((*shape, 2, table_rank), dtype=torch.int64)  # unused: offset 0
    rows, cursor = [], 64  # [0, 64) stays NaN
    for slot, layer, t in ranks.nonzero().tolist():
        in_f, out_f = SHAPES[LORA_TARGETS[t]]
        for ab, width in enumerate((in_f, out_f)):
            for j in range(int(ranks[slot, layer, t])):
                cursor += int(torch.randint(0, 5, (1,), generator=g))
                offsets[slot, layer, t, ab, j] = cursor
                rows.append((cursor, torch.randn(width, generator=g) * 0.3))
                cursor += width
    pool = torch.full((cursor + 8,), float("nan"))
    for start, row in rows:
        pool[start : start + row.numel()] = row
    scalings = 0.5 + torch.rand(shape, generator=g)
    return pool, offsets, ranks, scalings


def _batch(spec, offsets, ranks, scalings, max_rank):
    """spec: (slot or None, rows) runs; base rows at both ends sit outside every segment,
    base rows between LoRA runs form a slot -1 segment."""
    lora = [i for i, (slot, _) in enumerate(spec) if slot is not None]
    seg_start, seg_slot, lengths, row = [], [], [], 0
    for i, (slot, n) in enumerate(spec):
        if lora[0] <= i <= lora[-1]:
            seg_start.append(row)
            seg_slot.append(-1 if slot is None else slot)
            lengths.append(n)
        row += n
    seg_start.append(seg_start[-1] + lengths[-1])
    batch = LoRABatch(
        seg_start=torch.tensor(seg_start, dtype=torch.int32),
        seg_slot=torch.tensor(seg_slot, dtype=torch.int32),
        row_offsets=offsets,
        ranks=ranks,
        scalings=scalings,
        max_rank=max_rank,
        max_seg_len=max(n for n, s in zip(lengths, seg_slot, strict=True) if s >= 0),
        num_segments=len(seg_slot),
    )
    return batch, row


DECODE = [(None, 2), (0, 1), (1, 1), (None, 1), (3, 1), (2, 1), (0, 1), (None, 3)]
PREFILL = [(1, 5), (None, 2), (0, 9), (3, 4), (2, 2), (1, 1), (None, 1)]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("spec", [DECODE, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("extra_rank", [0, 5])
def test_bmm_matches_reference(spec, call, extra_rank):
    g = torch.Generator().manual_seed(1)
    max_rank = 16 + extra_rank  # padding beyond every adapter's rank reads nothing
    pool, offsets, ranks, scalings = _pool_and_tables(g, max_rank)
    batch, rows = _batch(spec, offsets, ranks, scalings, max_rank)
    first, slices = CALLS[call]
    in_f = SHAPES[LORA_TARGETS[first]][0]
    x = torch.randn(rows, in_f, generator=g)
    y0 = torch.randn(rows, sum(n for _, n in slices), generator=g)
    want, got = y0.clone(), y0.clone()
    lora_apply_ref(x, want, pool, batch, LAYER, first, slices)
    lora_apply_bmm(x, got, pool, batch, LAYER, first, slices)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    untouched = (want == y0).all(dim=1)  # base rows and adapters without this layer
    assert untouched.any() and torch.equal(got[untouched], y0[untouched])
    via_dispatch = y0.clone()
    lora_apply(x, via_dispatch, pool, batch, LAYER, first, slices, backend="bmm")
    assert torch.equal(via_dispatch, got)


def test_bmm_chunks_rows(monkeypatch):
    """Small chunks (bounded scratch) give the same result."""
    import loraserve.kernels.lora as lora

    g = torch.Generator().manual_seed(2)
    pool, offsets, ranks, scalings = _pool_and_tables(g, 16)
    batch, rows = _batch(PREFILL, offsets, ranks, scalings, 16)
    x = torch.randn(rows, H, generator=g)
    y0 = torch.randn(rows, Q + 2 * KV, generator=g)
    whole, chunked = y0.clone(), y0.clone()
    lora_apply_bmm(x, whole, pool, batch, LAYER, *CALLS["qkv"])
    monkeypatch.setattr(lora, "_BMM_CHUNK_ELEMS", 16 * H * 3)  # 3 rows per chunk
    lora_apply_bmm(x, chunked, pool, batch, LAYER, *CALLS["qkv"])
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_bmm_prefill_gathers_per_segment(monkeypatch):
    """Prompt segments gather each adapter once per segment (S-LoRA's padded bmm), not once
    per row: the per-row gather is not used there."""
    import loraserve.kernels.lora as lora

    def per_row(*args):
        raise AssertionError("per-row gather in a prefill batch")

    g = torch.Generator().manual_seed(3)
    pool, offsets, ranks, scalings = _pool_and_tables(g, 16)
    batch, rows = _batch(PREFILL, offsets, ranks, scalings, 16)
    x = torch.randn(rows, H, generator=g)
    want, got = torch.zeros(rows, Q + 2 * KV), torch.zeros(rows, Q + 2 * KV)
    lora_apply_ref(x, want, pool, batch, LAYER, *CALLS["qkv"])
    monkeypatch.setattr(lora, "_token_slots", per_row)
    lora_apply_bmm(x, got, pool, batch, LAYER, *CALLS["qkv"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
