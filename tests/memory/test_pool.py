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


def test_oldest_takes_the_pages_freed_longest_ago_in_ascending_ids():
    pool = make_pool(8)
    pages = pool.allocate(8, PageKind.KV)
    assert pages == list(range(8))  # (low ids first)
    for p in (5, 2, 7, 0):  # freed in this order: 5 and 2 longest ago
        pool.free([p])
    assert pool.allocate(2, PageKind.ADAPTER, oldest=True) == [2, 5]
    assert pool.allocate(1, PageKind.KV) == [0]  # the default: the latest freed first
    assert pool.allocate(1, PageKind.ADAPTER, oldest=True) == [7]
    pool.check_integrity()


class FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_fence_for_is_the_first_fence_after_the_latest_free():
    """An adapter copy into freed pages waits for the first fence recorded after they were
    freed (the steps enqueued before the free may still write them), nothing once that
    fence has passed, and for a fence recorded on the spot when none was since."""
    pool = make_pool(8)
    recorded = []

    def record() -> FakeEvent:
        recorded.append(FakeEvent())
        return recorded[-1]

    pool._record = record  # (fences are CUDA events; the bookkeeping is the pool's)
    a, b, c = (pool.allocate(2, PageKind.KV) for _ in range(3))
    pool.free(a)
    first = record()
    pool._add_fence(first)  # after a's free
    pool.free(b)
    second = record()
    pool._add_fence(second)
    assert pool.fence_for(a) is first
    assert pool.fence_for(a + b) is second  # the latest free decides
    first.done = True
    assert pool.fence_for(a) is None
    assert pool.fence_for(b) is second
    pool.free(c)  # after every fence: one is recorded now
    now = pool.fence_for(c)
    assert now is recorded[-1] and len(recorded) == 3
    assert pool.fence_for(c) is now  # and reused
    second.done = now.done = True
    assert pool.fence_for(a + b + c) is None
    assert not pool._fences  # passed fences are dropped


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
