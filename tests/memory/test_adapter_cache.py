"""AdapterCache packing: rows land where the tables say, in whole rows per page; failed loads
change nothing and give their staging buffer back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraserve.adapters.peft import FlatEntry, FlatLoRA, LoRAWeights, random_lora_weights
from loraserve.config import LORA_TARGETS, ModelConfig
from loraserve.memory.adapter_cache import AdapterCache, _page_runs
from loraserve.memory.pool import PageKind, PagePool

# hidden 24, GQA 4/2 heads of 6 (kv 12), intermediate 40: widths 24, 12 and 40
MODEL = ModelConfig(100, 24, 40, 3, 4, 2, 6)
PAGE = 100  # not a multiple of any width: rows must skip page ends


def make_cache(num_pages: int = 40, max_loras: int = 4, dtype=torch.float32) -> AdapterCache:
    pool = PagePool(num_pages, PAGE, dtype, "cpu")
    pool.buffer.fill_(float("nan"))  # unwritten pool memory must never be read as a row
    return AdapterCache(pool, MODEL, max_loras, max_rank=8)


@pytest.mark.parametrize("fragmented", [False, True])
def test_rows_are_where_the_tables_point(fragmented):
    cache = make_cache()
    if fragmented:  # free pages scattered between used ones: copies of single pages and runs
        held = cache.pool.allocate(12, PageKind.KV)
        cache.pool.free(held[::2])
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    weights = random_lora_weights("a", MODEL, 5, targets, seed=0)
    packed = cache.pack(weights)
    assert packed.num_pages == cache.pages_needed(weights)
    assert cache.load(packed) and cache.is_ready("a")
    slot = cache.get("a").slot
    pool = cache.pool.buffer.view(-1)
    for layer in range(MODEL.num_hidden_layers):
        for t, target in enumerate(LORA_TARGETS):
            module = weights.modules.get((layer, target))
            rank = int(cache.ranks[slot, layer, t])
            if module is None:
                assert rank == 0
                continue
            assert rank == 5 and cache.scalings[slot, layer, t] == module.scaling
            for ab, rows in ((0, module.a), (1, module.b.t())):
                width = rows.shape[1]
                for j in range(rank):
                    start = int(cache.row_offsets[slot, layer, t, ab, j])
                    assert start // PAGE == (start + width - 1) // PAGE, "a row crosses a page"
                    assert start // PAGE in cache.get("a").pages
                    assert torch.equal(pool[start : start + width], rows[j])
    pages = cache.get("a").pages
    runs = [n for _, _, n in _page_runs(pages)]
    assert (max(runs) > 1 and len(runs) > 1) if fragmented else len(runs) == 1, pages
    cache.check_integrity()


def test_a_load_that_does_not_fit_changes_nothing():
    cache = make_cache(num_pages=3)
    weights = random_lora_weights("big", MODEL, 8, list(LORA_TARGETS), seed=1)
    packed = cache.pack(weights)
    assert packed.num_pages > 3
    spare = len(cache._staging._buffers)
    assert not cache.load(packed)
    assert "big" not in cache and cache.pool.num_used(PageKind.ADAPTER) == 0
    assert len(cache._staging._buffers) == spare + 1  # the staging buffer came back
    cache.check_integrity()


def test_a_load_evicts_no_protected_adapter_and_may_keep_its_buffer():
    cache = make_cache(max_loras=2)
    for name in ("a", "b"):
        assert cache.load(random_lora_weights(name, MODEL, 2, ["k_proj"], seed=3))
    packed = cache.pack(random_lora_weights("c", MODEL, 2, ["k_proj"], seed=4))
    spare = len(cache._staging._buffers)
    assert not cache.load(packed, protect={"a", "b"}, keep=True)  # no slot but theirs
    assert "a" in cache and "b" in cache and "c" not in cache
    assert len(cache._staging._buffers) == spare  # kept: the caller still holds it
    assert cache.load(packed, protect={"a"})  # "b" (idle) goes instead of "a", the LRU one
    assert "a" in cache and "b" not in cache and "c" in cache
    assert cache.stats.gpu_evictions == 1
    cache.check_integrity()


def test_slot_ranks_follow_loads_and_evictions():
    """AdapterCache.slot_ranks (each slot's largest rank, which picks a decode step's
    small-rank graphs) is set at load and cleared when the adapter leaves its slot."""
    cache = make_cache(max_loras=2)
    assert cache.load(random_lora_weights("a", MODEL, 3, ["k_proj"], seed=5))
    assert cache.load(random_lora_weights("b", MODEL, 7, ["q_proj", "o_proj"], seed=6))
    a, b = cache.get("a").slot, cache.get("b").slot
    assert (cache.slot_ranks[a], cache.slot_ranks[b]) == (3, 7)
    cache.evict("b")
    assert cache.slot_ranks[b] == 0 and cache.slot_ranks[a] == 3
    assert cache.load(random_lora_weights("c", MODEL, 5, ["v_proj"], seed=7))
    assert cache.slot_ranks[cache.get("c").slot] == 5
    assert cache.load(random_lora_weights("d", MODEL, 1, ["v_proj"], seed=8))  # evicts one
    assert sorted(cache.slot_ranks) == sorted(cache.slot_ranks[r.slot] for r in cache.resident())
    assert sorted(cache.slot_ranks[r.slot] for r in cache.resident()) in ([1, 3], [1, 5])


def test_loading_a_resident_adapter_again_gives_its_buffer_back():
    cache = make_cache()
    weights = random_lora_weights("a", MODEL, 2, ["k_proj"], seed=2)
    assert cache.load(weights)  # LoRAWeights are packed on the spot
    pages = cache.pool.num_used(PageKind.ADAPTER)
    made = cache.staging["allocations"]
    again = cache.pack(weights)
    assert cache.staging["allocations"] == made  # the first load's buffer, reused
    spare = len(cache._staging._buffers)
    assert cache.load(again)
    assert cache.pool.num_used(PageKind.ADAPTER) == pages
    assert len(cache._staging._buffers) == spare + 1
    assert made >= 1 and cache.staging["bytes"] >= made * (1 << 22)


def test_reserved_staging_buffers_serve_loads_in_flight_together():
    """reserve_staging makes free buffers as large as the largest adapter packed so far, up
    to the count asked for; packs in flight together then take them instead of making new
    ones."""
    cache = make_cache()
    assert cache.reserve_staging(4) == 0  # nothing packed yet: no size to make them at
    assert cache.load(random_lora_weights("a", MODEL, 2, ["k_proj", "o_proj"], seed=1))
    made = cache.staging["allocations"]
    assert cache.reserve_staging(3) == 2  # the first load's buffer came back: one is free
    assert cache.reserve_staging(3) == 0
    assert cache.staging["allocations"] == made + 2
    packed = [
        cache.pack(random_lora_weights(n, MODEL, r, ["k_proj", "o_proj"], seed=2))
        for n, r in (("b", 2), ("c", 1), ("d", 2))
    ]
    assert cache.staging["allocations"] == made + 2  # three in flight, none made
    for p in packed:
        cache.discard(p)


def test_rank_above_the_served_maximum_is_refused_when_packing():
    cache = make_cache()
    with pytest.raises(ValueError, match="max_lora_rank=8"):
        cache.pack(random_lora_weights("r16", MODEL, 16, ["q_proj"], seed=3))


def test_staging_buffers_best_fit_and_as_large_as_the_largest_asked_for():
    from loraserve.memory.adapter_cache import _StagingPool

    pool = _StagingPool(torch.float32, pinned=False)
    small, big = 1 << 22, 3 << 22
    a = pool.take(small)
    b = pool.take(big)
    c = pool.take(small)  # made after a larger one: as large as it, so it fits any adapter
    assert (a._base.numel(), b._base.numel(), c._base.numel()) == (small, big, big)
    assert pool.allocations == 3
    for buf in (b, a):  # the big one first: a first fit would take it
        pool.give_back(buf, None)
    again = pool.take(small)  # the smallest free buffer that fits, not the first
    assert again._base.numel() == small
    assert pool.take(big)._base.numel() == big and pool.allocations == 3


def test_page_runs():
    assert _page_runs([4, 5, 6, 9, 2, 3, 10]) == [(0, 4, 3), (3, 9, 1), (4, 2, 2), (6, 10, 1)]
    assert _page_runs([7]) == [(0, 7, 1)]
    assert _page_runs([]) == []


def flat_copy(weights: LoRAWeights) -> LoRAWeights:
    """The same adapter as a FlatLoRA (A's rows, then B^T's rows or B as stored, by turns;
    modules in reverse order, so the packing must sort them)."""
    values, entries, offset = [], [], 0
    for k, ((layer, target), m) in enumerate(reversed(list(weights.modules.items()))):
        rank, in_f = m.a.shape
        b_rows = k % 2 == 0  # B^T's rows (generated adapters) or B as stored (files)
        b = m.b.t() if b_rows else m.b
        entry = FlatEntry(
            layer, target, rank, in_f, m.b.shape[0], offset, offset + m.a.numel(), b_rows, m.scaling
        )
        entries.append(entry)
        values += [m.a.reshape(-1), b.reshape(-1)]
        offset += m.a.numel() + m.b.numel()
    return LoRAWeights(weights.name, weights.config, flat=FlatLoRA(torch.cat(values), entries))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_flat_adapter_packs_and_loads_as_its_modules_do(dtype):
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    weights = random_lora_weights("a", MODEL, 5, targets, 3, dtype=dtype)
    flat = flat_copy(weights)
    assert flat.nbytes == weights.nbytes and flat.rank(1, "v_proj") == 5
    assert flat.rank(1, "k_proj") == 0
    for key, m in weights.modules.items():  # views made on first use
        assert torch.equal(flat.modules[key].a, m.a) and torch.equal(flat.modules[key].b, m.b)
    caches = [make_cache(dtype=dtype), make_cache(dtype=dtype)]
    packs = [cache.pack(w) for cache, w in zip(caches, (weights, flat), strict=True)]
    assert packs[0].num_pages == packs[1].num_pages
    for name in ("rel_page", "rel_mod"):
        assert np.array_equal(getattr(packs[0], name), getattr(packs[1], name))
    assert torch.equal(packs[0].ranks, packs[1].ranks)
    assert torch.equal(packs[0].scalings, packs[1].scalings)
    for cache, packed in zip(caches, packs, strict=True):
        assert cache.load(packed)
    assert torch.equal(caches[0].row_offsets, caches[1].row_offsets)
    pools = [cache.pool.buffer.view(-1) for cache in caches]
    slot = caches[0].get("a").slot
    for (layer, target), m in weights.modules.items():
        t = LORA_TARGETS.index(target)
        for ab, rows in ((0, m.a), (1, m.b.t())):
            for j in range(rows.shape[0]):
                start = int(caches[0].row_offsets[slot, layer, t, ab, j])
                for pool in pools:
                    assert torch.equal(pool[start : start + rows.shape[1]], rows[j])


def test_weights_take_modules_or_flat_rows():
    weights = random_lora_weights("a", MODEL, 2, ["k_proj"], seed=4)
    with pytest.raises(ValueError, match="exactly one"):
        LoRAWeights("a", weights.config)
    with pytest.raises(ValueError, match="exactly one"):
        LoRAWeights("a", weights.config, weights.modules, flat_copy(weights).flat)


def test_a_generated_adapters_rows_go_in_one_copy_per_stretch_of_pages(monkeypatch):
    """Rows that follow each other in a flat adapter and in its pages are copied together:
    each copy call's arguments are built holding the GIL (I/O threads beside the engine's),
    so a 7B adapter's 256 matrices must not be 256 copies."""
    from loraserve.bench.adapters import WeightBank, banked_lora_weights  # noqa: PLC0415

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    bank = WeightBank(MODEL, 8, torch.float32)
    weights = banked_lora_weights(bank, "g", MODEL, 8, targets, seed=1)
    copies = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s: copies.append(len(d)) or real(d, s))
    big = AdapterCache(PagePool(4, 1 << 14, torch.float32, "cpu"), MODEL, 4, max_rank=8)
    packed = big.pack(weights)
    assert packed.num_pages == 1 and copies == [1]
    small = make_cache(num_pages=80)  # PAGE 100: rows never cross a page end: stretches break
    packed = small.pack(weights)
    assert 1 < copies[-1] <= packed.num_pages
    assert small.load(packed)
    pool = small.pool.buffer.view(-1)
    slot = small.get("g").slot
    for (layer, target), m in weights.modules.items():
        t = LORA_TARGETS.index(target)
        for ab, rows in ((0, m.a), (1, m.b.t())):
            for j in range(rows.shape[0]):
                start = int(small.row_offsets[slot, layer, t, ab, j])
                assert torch.equal(pool[start : start + rows.shape[1]], rows[j])
