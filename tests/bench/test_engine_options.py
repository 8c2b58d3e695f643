"""The engine options the ablations use: a separate adapter pool, the bmm backend."""

from __future__ import annotations

import dataclasses
import time

import pytest

from loraserve.bench.adapters import register_adapters
from loraserve.config import LoRAConfig
from loraserve.memory.pool import PageKind
from loraserve.request import SamplingParams

ADAPTERS = 3
RANKS = (8, 2, 16)
PROMPTS = [[(7 * i + j) % 211 for j in range(5 + 3 * i)] for i in range(8)]


def _generate(
    args, check_integrity: bool = False, use_adapters: bool = True
) -> tuple[list[list[int]], object]:
    engine = args.create_engine()
    register_adapters(engine, ADAPTERS, RANKS, ("q_proj", "v_proj", "o_proj", "down_proj"))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        adapter = None if i % 4 == 3 or not use_adapters else f"adapter-{i % ADAPTERS:04d}"
        engine.add_request(prompt, params, request_id=str(i), adapter=adapter)
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                tokens[out.request_id] = out.token_ids
        if check_integrity:
            engine.check_integrity()
    engine.adapters.shutdown()
    return [tokens[str(i)] for i in range(len(PROMPTS))], engine


def test_separate_pool_same_tokens_as_unified(engine_args):
    unified, engine = _generate(engine_args)
    page_bytes = engine.pool.page_bytes
    assert engine.adapter_cache.pool is engine.pool
    # room for about one adapter at a time: adapters are evicted and requests wait for room
    small = dataclasses.replace(engine_args, adapter_pool_bytes=14 * page_bytes)
    separate, engine = _generate(small, check_integrity=True)
    assert separate == unified
    adapter_pool = engine.adapter_cache.pool
    assert adapter_pool is not engine.pool and adapter_pool.num_pages == 14
    assert adapter_pool.page_elems == engine.pool.page_elems
    assert engine.pool.num_used(PageKind.ADAPTER) == 0
    assert engine.adapter_cache.stats.gpu_evictions > 0
    engine.check_integrity()


def test_separate_pool_takes_its_bytes_from_the_budget(engine_args):
    unified = dataclasses.replace(engine_args, num_pages=None, pool_bytes=200 * 6144)
    engine = unified.create_engine()
    assert engine.pool.page_bytes == 6144 and engine.pool.num_pages == 200
    split = dataclasses.replace(unified, adapter_pool_bytes=50 * 6144)
    engine = split.create_engine()
    assert engine.pool.num_pages == 150 and engine.adapter_cache.pool.num_pages == 50
    with pytest.raises(ValueError, match="adapter_pool_bytes"):
        dataclasses.replace(engine_args, adapter_pool_bytes=100).create_engine()
    with pytest.raises(ValueError, match="adapter_pool_bytes"):
        LoRAConfig(adapter_pool_bytes=0)


def test_bmm_backend_same_tokens_as_torch(engine_args):
    torch_tokens, _ = _generate(dataclasses.replace(engine_args, lora_backend="torch"))
    bmm_tokens, engine = _generate(dataclasses.replace(engine_args, lora_backend="bmm"))
    assert engine.config.lora_backend == "bmm"
    assert bmm_tokens == torch_tokens
    base_tokens, _ = _generate(engine_args, use_adapters=False)
    changed = [i for i in range(len(PROMPTS)) if base_tokens[i] != torch_tokens[i]]
    assert changed and all(i % 4 != 3 for i in changed)  # the adapters matter


def test_unknown_backend_is_refused(engine_args):
    with pytest.raises(ValueError, match="lora_backend"):
        dataclasses.replace(engine_args, lora_backend="punica").create_engine()


def test_max_loras_defaults_to_twice_the_batch(engine_args):
    """Every row of a full batch on an adapter of its own, and as many slots again for
    cached and prefetched adapters; an explicit value is kept."""
    for max_num_seqs, max_loras, slots in ((8, None, 16), (256, None, 512), (8, 3, 3)):
        args = dataclasses.replace(engine_args, max_num_seqs=max_num_seqs, max_loras=max_loras)
        engine = args.create_engine()
        assert engine.config.lora.max_loras == engine.adapter_cache.max_loras == slots
    with pytest.raises(ValueError, match="max_loras must be positive"):
        dataclasses.replace(engine_args, max_loras=0).create_engine()


@pytest.mark.parametrize("depth", [0, 2])
def test_adapter_prefetch_starts_the_first_queued_adapters(engine_args, depth):
    """While one request runs (max_num_seqs 1), each step starts loading the adapters of
    the first ``depth`` distinct adapters in the queue, and no others."""
    engine = dataclasses.replace(
        engine_args, max_num_seqs=1, adapter_prefetch=depth
    ).create_engine()
    assert engine.config.lora.prefetch == depth
    register_adapters(engine, 4, (8,), ("q_proj",))
    names = [f"adapter-{i:04d}" for i in range(4)]
    deadline = time.monotonic() + 30
    while not engine.adapters.ensure(names[0]):  # r0's, so that it starts at once
        assert time.monotonic() < deadline
        time.sleep(0.01)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, adapter in enumerate([names[0], names[1], names[1], names[2], names[3]]):
        engine.add_request([5, 6, 7], params, request_id=f"r{i}", adapter=adapter)
    engine.step()  # r0 starts; the batch is full, so admission looks no further
    assert [r.request_id for r in engine.scheduler.running] == ["r0"]
    started = [engine.adapters.stage(n) != "idle" for n in names[1:]]
    assert started == [True, True, False][:depth] + [False] * (3 - depth)
    assert engine.scheduler.waiting_adapters(depth) == names[1 : 1 + depth]
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(ValueError, match="adapter_prefetch must be >= 0"):
        dataclasses.replace(engine_args, adapter_prefetch=-1).create_engine()


def test_prefetch_with_few_slots_evicts_no_adapter_needed_sooner(engine_args):
    """Two adapter slots, one request running on adapter 0, the queue's next adapters 1
    then 2: prefetch loads 1 into the free slot; loading 2 would evict 1, needed sooner,
    so 2 waits packed (not read again) until a slot frees."""
    engine = dataclasses.replace(
        engine_args, max_num_seqs=1, max_loras=2, adapter_prefetch=2
    ).create_engine()
    engine.adapters.shutdown()
    engine.adapters._executor = None  # loads on the engine thread: no timing in the test
    register_adapters(engine, 3, (8,), ("q_proj",))
    names = [f"adapter-{i:04d}" for i in range(3)]
    reads = []
    pack = engine.adapters._pack
    engine.adapters._pack = lambda name: reads.append(name) or pack(name)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(names):
        engine.add_request([5, 6, 7], params, request_id=f"r{i}", adapter=name)
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["r0"]
    assert names[1] in engine.adapter_cache and engine.adapter_cache.is_ready(names[1])
    assert engine.adapters.stage(names[2]) == "packed"
    assert engine.adapters.no_room > 0  # the tries that found only protected slots
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["r0", "r1", "r2"]
    assert all(len(o.token_ids) == 4 for o in done.values())
    assert sorted(reads) == names  # each adapter read and packed once
