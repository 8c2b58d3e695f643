"""The adapter I/O threads run torch's CPU ops on one core each, and only they do; while the
engine thread waits for the device, the I/O thread that packed an adapter loads it too."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from loraserve.adapters.peft import random_lora_weights
from loraserve.adapters.store import AdapterStore
from loraserve.config import LORA_TARGETS, ModelConfig
from loraserve.engine.adapters import AdapterManager
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.pool import PageKind, PagePool
from loraserve.model.loader import PRESETS


@pytest.mark.skipif(
    "OpenMP" not in torch.__config__.parallel_info(), reason="torch built without OpenMP"
)
def test_io_threads_use_one_cpu_thread_and_leave_the_others_alone():
    model = PRESETS["llama-7b"]
    cache = AdapterCache(PagePool(2, 1 << 16, torch.float32, "cpu"), model, 4, 16)
    manager = AdapterManager(AdapterStore(model, torch.float32, 0), cache)
    before = torch.get_num_threads()
    try:
        assert manager._executor.submit(torch.get_num_threads).result() == 1
    finally:
        manager.shutdown()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == before
    assert seen == [before] or before == 1  # threads started later keep torch's default


def test_adapter_io_threads_is_an_engine_option(tiny_model_factory):
    from loraserve.engine.args import EngineArgs  # noqa: PLC0415

    model_dir = tiny_model_factory()
    engine = EngineArgs(model=str(model_dir), adapter_io_threads=3).create_engine()
    try:
        assert engine.adapters.threads == 3 and engine.adapters._executor._max_workers == 3
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="adapter_io_threads must be positive"):
        EngineArgs(model=str(model_dir), adapter_io_threads=0).create_engine()


# ---- loads finished on the I/O thread while the engine thread waits (device_wait) --------

TINY = ModelConfig(100, 24, 40, 3, 4, 2, 6)  # hidden 24, GQA 4/2 heads, intermediate 40


@contextlib.contextmanager
def gated_manager(max_loras=4, copy_in_wait=True):
    """An AdapterManager over a CPU pool with adapters a, b, c (rank 4, all targets) whose
    generation waits for the gates given with it; shut down on leaving."""
    cache = AdapterCache(PagePool(200, 100, torch.float32, "cpu"), TINY, max_loras, 8)
    store = AdapterStore(TINY, torch.float32, 1 << 30)
    gates = {}
    for i, name in enumerate("abc"):
        gates[name] = threading.Event()
        weights = random_lora_weights(name, TINY, 4, list(LORA_TARGETS), seed=i)

        def make(gate=gates[name], weights=weights):
            assert gate.wait(30)
            return weights

        store.register_generated(name, make, weights.nbytes)
    manager = AdapterManager(store, cache, threads=2, copy_in_wait=copy_in_wait)
    try:
        yield manager, gates
    finally:
        manager.shutdown()


def test_an_adapter_packed_during_a_device_wait_is_loaded_by_its_io_thread():
    with gated_manager() as (manager, gates):
        assert not manager.ensure("a") and manager.stage("a") == "reading"
        future = manager._fetching["a"]
        with manager.device_wait(["a"]):
            gates["a"].set()
            assert future.result(timeout=30) is None  # consumed by the I/O thread's load
            assert manager.stage("a") == "ready"  # (CPU copies are done when launched)
        assert manager.thread_loads == 1 and "a" not in manager._fetching
        assert manager.ensure("a")
        assert [len(r) for r in manager.load_times.records] == [4]
        manager.cache.check_integrity()


@pytest.mark.parametrize("copy_in_wait", [True, False])
def test_outside_a_device_wait_a_packed_adapter_waits_for_the_engine_thread(copy_in_wait):
    with gated_manager(copy_in_wait=copy_in_wait) as (manager, gates):
        manager.ensure("a")
        future = manager._fetching["a"]
        gates["a"].set()
        assert future.result(timeout=30) is not None
        assert manager.stage("a") == "packed" and "a" not in manager.cache
        if not copy_in_wait:  # the option off: a device wait changes nothing
            with manager.device_wait(["a"]):
                assert manager.stage("a") == "packed"
        assert manager.ensure("a") and manager.thread_loads == 0


@pytest.mark.parametrize("c_first", [False, True])
def test_a_load_in_a_device_wait_evicts_none_of_the_adapters_needed_before_it(c_first):
    # room for two adapters: a and b resident and idle, c packed during the wait
    with gated_manager(max_loras=2) as (manager, gates):
        for name in "ab":
            gates[name].set()
            manager.ensure(name)
            manager._fetching[name].result(timeout=30)
            assert manager.ensure(name)
        manager.ensure("c")
        future = manager._fetching["c"]
        with manager.device_wait(["c", "a", "b"] if c_first else ["a", "b", "c"]):
            gates["c"].set()
            assert future.result(timeout=30) is None
        if c_first:  # needed first: it takes the least recently used one's room (a's)
            assert manager.stage("c") == "ready" and manager.thread_loads == 1
            assert "a" not in manager.cache and "b" in manager.cache
        else:  # needed after a and b: it waits, packed, for the engine thread
            assert manager.stage("c") == "packed" and manager.no_room == 1
            assert "a" in manager.cache and "b" in manager.cache and manager.thread_loads == 0
            assert manager.ensure("c", ["a"])  # the engine thread's next look: b makes room
            assert "a" in manager.cache and "b" not in manager.cache
        manager.cache.check_integrity()


def test_an_adapter_forgotten_while_it_packs_is_not_loaded_in_a_device_wait():
    with gated_manager() as (manager, gates):
        manager.ensure("a")
        future = manager._fetching["a"]
        manager.forget("a")
        spare = len(manager.cache._staging._buffers)
        with manager.device_wait(["a"]):
            gates["a"].set()
            assert future.result(timeout=30) is not None  # left to the discard callback
        assert "a" not in manager.cache and manager.thread_loads == 0
        assert len(manager.cache._staging._buffers) == spare + 1  # its buffer came back
        assert manager.cache.pool.num_used(PageKind.ADAPTER) == 0


def test_adapter_copy_in_wait_is_an_engine_option(tiny_model_factory):
    from loraserve.engine.args import EngineArgs  # noqa: PLC0415

    model_dir = tiny_model_factory()
    for value in (True, False):
        engine = EngineArgs(model=str(model_dir), adapter_copy_in_wait=value).create_engine()
        try:
            assert engine.adapters.copy_in_wait is value
        finally:
            engine.shutdown()


def test_an_error_in_an_io_threads_load_is_raised_on_the_engine_thread():
    with gated_manager() as (manager, gates):
        manager.ensure("a")
        future = manager._fetching["a"]

        def broken_load(*args, **kwargs):
            raise RuntimeError("a bug in the load")

        manager.cache.load = broken_load
        with pytest.raises(RuntimeError, match="I/O thread failed.*a bug in the load"):
            with manager.device_wait(["a"]):
                gates["a"].set()
                with pytest.raises(RuntimeError, match="a bug in the load"):
                    future.result(timeout=30)
        with manager.device_wait(["a"]):  # raised once
            pass
