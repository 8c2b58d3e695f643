"""The adapter I/O threads run torch's CPU ops on one core each, and only they do."""

from __future__ import annotations

import threading

import pytest
import torch

from loraserve.adapters.store import AdapterStore
from loraserve.engine.adapters import AdapterManager
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.pool import PagePool
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
