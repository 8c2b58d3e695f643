"""PagePool and KV block tables."""

from __future__ import annotations

import random

import pytest
import torch

from loraserve.memory.kv_cache import KVCacheManager
from loraserve.memory.pool import PageKind, PagePool, kv_page_elems
from loraserve.request import Request, SamplingParams


def make_pool(num_pages=10, page_elems=64):
    return PagePool(num_pages, page_elems, torch.float32, "cpu")


def test_allocate_is_all_or_nothing():
    pool = make_pool(4)
    a = pool.allocate(3, PageKind.KV)
    assert len(a) == 3 and pool.num_free == 1
    assert pool.allocate(2, PageKind.ADAPTER) is None
    assert pool.num_free == 1
    pool.free(a)
    pool.check_integrity()
    assert pool.num_free == 4


def test_double_free_is_caught():
    pool = make_pool(4)
    pages = pool.allocate(2, PageKind.KV)
    pool.free(pages)
    with pytest.raises(RuntimeError, match="twice"):
        pool.free(pages[:1])


def test_reclaimer_is_asked_before_failing():
    pool = make_pool(4)
    held = pool.allocate(4, PageKind.ADAPTER)
    asked = []

    def reclaim(n: int) -> int:
        asked.append(n)
        give = held[:n]
        del held[:n]
        pool.free(give)
        return len(give)

    pool.add_reclaimer(reclaim)
    got = pool.allocate(2, PageKind.KV)
    assert asked == [2] and len(got) == 2
    assert pool.num_used(PageKind.ADAPTER) == 2 and pool.num_used(PageKind.KV) == 2
    pool.check_integrity()


def test_random_alloc_free_keeps_counts():
    rng = random.Random(0)
    pool = make_pool(32)
    owned: list[list[int]] = []
    for _ in range(500):
        if owned and rng.random() < 0.5:
            pool.free(owned.pop(rng.randrange(len(owned))))
        else:
            pages = pool.allocate(rng.randrange(1, 6), rng.choice([PageKind.KV, PageKind.ADAPTER]))
            if pages is not None:
                owned.append(pages)
        pool.check_integrity()
    flat = [p for ps in owned for p in ps]
    assert len(flat) == len(set(flat)) == pool.num_pages - pool.num_free


def test_kv_view_geometry_and_pages_do_not_overlap():
    layers, bs, kvh, hd = 3, 4, 2, 5
    pool = PagePool(6, kv_page_elems(layers, bs, kvh, hd), torch.float32, "cpu")
    kv = pool.kv_view(layers, bs, kvh, hd)
    assert kv.shape == (6, layers, 2, bs, kvh, hd)
    pool.buffer.zero_()
    kv[2, 1, 0, 3] = 1.0  # page 2, layer 1, K, slot 3
    touched = pool.buffer.nonzero()[:, 0].unique().tolist()
    assert touched == [2]
    with pytest.raises(ValueError, match="geometry"):
        pool.kv_view(layers, bs * 2, kvh, hd)


def test_kv_manager_grows_block_tables_by_pages():
    pool = make_pool(8)
    kv = KVCacheManager(pool, block_size=16)
    r = Request("r", [1] * 20, SamplingParams())
    assert kv.allocate(r, 20) and len(r.block_table) == 2
    assert kv.allocate(r, 32) and len(r.block_table) == 2
    assert kv.allocate(r, 33) and len(r.block_table) == 3
    assert not kv.allocate(r, 16 * 9) and len(r.block_table) == 3
    kv.free(r)
    assert r.block_table == [] and pool.num_free == 8
