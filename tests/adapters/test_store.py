"""AdapterStore: registration reads only configs; the host tier is a byte-budgeted LRU."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from loraserve.adapters.peft import (
    AdapterError,
    LoRAWeights,
    estimate_nbytes,
    make_random_adapter,
    random_lora_weights,
    read_adapter_config,
)
from loraserve.adapters.store import AdapterStore
from loraserve.config import ModelConfig

MODEL = ModelConfig(
    vocab_size=211,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    name="tiny",
)
# rank 4 on q_proj: 3 layers * 4 * (48 + 48) * 4 bytes
SIZE = 3 * 4 * 96 * 4


@pytest.fixture
def adapters(tmp_path) -> dict[str, Path]:
    return {
        name: make_random_adapter(tmp_path / name, MODEL, rank=4, targets=["q_proj"], seed=i)
        for i, name in enumerate("abcd")
    }


def make_store(adapters: dict[str, Path], budget: int) -> AdapterStore:
    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=budget)
    for name, path in adapters.items():
        store.register(name, path)
    return store


def host_names(store: AdapterStore) -> set[str]:
    return {n for n in store.names() if store.in_host(n)}


def test_register_reads_only_the_config(adapters):
    path = adapters["a"]
    (path / "adapter_model.safetensors").unlink()
    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=10 * SIZE)
    config = store.register("a", path)
    assert config == read_adapter_config(path)
    assert "a" in store and store.names() == ["a"] and store.config("a") == config
    assert store.nbytes("a") == SIZE == estimate_nbytes(config, MODEL, torch.float32)
    with pytest.raises(AdapterError, match="no weights file .adapter_model.safetensors"):
        store.get("a")
    assert store.stats.disk_loads == 0 and store.stats.host_bytes == 0


def test_corrupt_weights_fail_at_get_and_are_retried(adapters):
    store = make_store({"a": adapters["a"]}, 10 * SIZE)
    file = adapters["a"] / "adapter_model.safetensors"
    good = file.read_bytes()
    file.write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="cannot read adapter_model.safetensors"):
        store.get("a")
    file.write_bytes(good)
    assert store.get("a").nbytes == SIZE
    store.check_integrity()


def test_register_validates_the_config(tmp_path, adapters):
    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=SIZE)
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        store.register("x", tmp_path / "nowhere")
    dora = make_random_adapter(tmp_path / "dora", MODEL, rank=4, targets=["q_proj"], seed=0)
    cfg = dora / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(AdapterError, match="field use_dora=True"):
        store.register("x", dora)
    assert "x" not in store


def test_lru_eviction_order_and_counters(adapters):
    store = make_store(adapters, budget=2 * SIZE + SIZE // 2)
    a = store.get("a")
    store.get("b")
    assert store.get("a") is a  # hit; b is now least recently used
    store.get("c")
    assert host_names(store) == {"a", "c"}
    store.get("b")
    assert host_names(store) == {"b", "c"}
    stats = store.stats
    assert (stats.host_hits, stats.host_misses, stats.disk_loads) == (1, 4, 4)
    assert stats.host_evictions == 2 and stats.host_bytes == 2 * SIZE
    store.check_integrity()


def test_adapter_bigger_than_budget_is_served_not_kept(tmp_path, adapters):
    big = make_random_adapter(tmp_path / "big", MODEL, rank=64, targets=["q_proj"], seed=1)
    store = make_store({"a": adapters["a"], "big": big}, budget=2 * SIZE)
    store.get("a")
    weights = store.get("big")
    assert weights.rank(0, "q_proj") == 64 and weights.nbytes > 2 * SIZE
    assert host_names(store) == {"a"}
    store.get("big")
    stats = store.stats
    assert stats.disk_loads == 3 and stats.host_evictions == 0 and stats.host_bytes == SIZE
    store.check_integrity()


def test_unregister(adapters):
    store = make_store(adapters, budget=10 * SIZE)
    store.get("a")
    store.unregister("a")
    assert "a" not in store and store.stats.host_bytes == 0
    with pytest.raises(KeyError, match="'a'"):
        store.get("a")
    with pytest.raises(KeyError, match="'a'"):
        store.unregister("a")
    store.register("a", adapters["b"])  # the name is free again
    store.check_integrity()


def test_unknown_name_is_a_key_error_naming_it(adapters):
    store = make_store(adapters, budget=SIZE)
    for call in (store.get, store.config, store.nbytes):
        with pytest.raises(KeyError, match="adapter 'nope' is not registered"):
            call("nope")


def test_names_and_duplicates(adapters):
    store = make_store({"a": adapters["a"]}, budget=SIZE)
    assert store.register("a", adapters["a"] / ".") == store.config("a")  # same dir: no-op
    with pytest.raises(ValueError, match="'a' is already registered"):
        store.register("a", adapters["b"])
    with pytest.raises(ValueError, match="'a' is already registered"):
        store.register_generated("a", lambda: None, SIZE)
    for bad in ["", "a/b", "a\\b", "a b", "..", "tab\t", "x" * 300]:
        with pytest.raises(ValueError, match="adapter name .* is invalid"):
            store.register(bad, adapters["b"])
    store.register("org-model_v1.2:latest@3", adapters["b"])


def test_generated_adapters_go_through_the_lru():
    calls: list[str] = []

    def maker(name: str, seed: int):
        def make() -> LoRAWeights:
            calls.append(name)
            return random_lora_weights(name, MODEL, rank=4, targets=["q_proj"], seed=seed)

        return make

    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=2 * SIZE)
    for i, name in enumerate(["g0", "g1", "g2"]):
        store.register_generated(name, maker(name, i), SIZE)
    assert store.config("g0") is None and store.nbytes("g0") == SIZE
    first = store.get("g0")
    for name in ["g1", "g0", "g2", "g1"]:
        store.get(name)
    assert calls == ["g0", "g1", "g2", "g1"]
    assert torch.equal(store.get("g0").modules[(0, "q_proj")].a, first.modules[(0, "q_proj")].a)
    stats = store.stats
    assert stats.generated_loads == 5 and stats.disk_loads == 0 and stats.host_evictions == 3
    store.check_integrity()


def test_evicted_weights_are_freed_outside_the_lock():
    """Freeing an evicted adapter's host memory takes milliseconds; the engine thread must
    not wait for it in its own store calls."""
    import weakref

    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=SIZE)
    for i, name in enumerate(["g0", "g1"]):
        store.register_generated(
            name,
            lambda name=name, i=i: random_lora_weights(name, MODEL, 4, ["q_proj"], seed=i),
            SIZE,
        )
    locked_at_free = []
    weakref.finalize(store.get("g0"), lambda: locked_at_free.append(store._lock.locked()))
    store.get("g1")  # evicts g0, whose last reference goes when g1 is kept
    assert store.stats.host_evictions == 1
    assert locked_at_free == [False]


def test_store_dtype(adapters):
    store = AdapterStore(MODEL, torch.bfloat16, host_budget_bytes=SIZE)
    store.register("a", adapters["a"])
    weights = store.get("a")
    assert weights.modules[(1, "q_proj")].a.dtype == torch.bfloat16
    assert weights.nbytes == SIZE // 2 == store.nbytes("a") == store.stats.host_bytes


def slow_maker(name: str, calls: list[str], delay: float = 0.05, fail: bool = False):
    def make() -> LoRAWeights:
        calls.append(name)
        time.sleep(delay)
        if fail:
            raise AdapterError(f"adapter {name}: broken")
        return random_lora_weights(name, MODEL, rank=4, targets=["q_proj"], seed=0)

    return make


def run_threads(n: int, fn) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except Exception as e:  # collected and checked by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_gets_share_one_load():
    calls: list[str] = []
    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=4 * SIZE)
    store.register_generated("g", slow_maker("g", calls), SIZE)
    results = run_threads(8, lambda i: store.get("g"))
    assert calls == ["g"]
    assert all(r is results[0] for r in results)
    store.check_integrity()


def test_concurrent_failure_reaches_every_waiter_and_is_retried():
    calls: list[str] = []
    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=4 * SIZE)
    store.register_generated("g", slow_maker("g", calls, fail=True), SIZE)
    results = run_threads(4, lambda i: store.get("g"))
    assert all(isinstance(r, AdapterError) for r in results) and calls == ["g"]
    with pytest.raises(AdapterError):
        store.get("g")
    assert calls == ["g", "g"]


def test_unregistered_during_load_is_not_kept():
    calls: list[str] = []
    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=4 * SIZE)
    store.register_generated("g", slow_maker("g", calls, delay=0.2), SIZE)
    thread = threading.Thread(target=store.get, args=("g",))
    thread.start()
    while not calls:
        time.sleep(0.01)
    store.unregister("g")
    thread.join()
    assert store.stats.host_bytes == 0 and not store.in_host("g")
    store.check_integrity()


def test_threads_hammering_a_small_budget():
    store = AdapterStore(MODEL, torch.float32, host_budget_bytes=3 * SIZE)
    names = [f"g{i}" for i in range(10)]
    for i, name in enumerate(names):
        store.register_generated(
            name,
            lambda name=name, i=i: random_lora_weights(name, MODEL, 4, ["q_proj"], seed=i),
            SIZE,
        )

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100):
            name = rng.choice(names)
            assert store.get(name).name == name

    assert run_threads(4, work) == [None] * 4
    stats = store.stats
    assert stats.host_hits + stats.host_misses == 400
    assert stats.host_bytes <= 3 * SIZE
    store.check_integrity()


def test_a_load_does_not_read_the_config_again_and_the_base_model_warning_comes_once(
    tmp_path, caplog
):
    """The config read at registration is the one a load uses (a load runs on an I/O thread
    beside the engine's: no JSON parse and target matching per load); a config naming
    another base model warns when it is registered, not on every load."""
    import json  # noqa: PLC0415
    import logging  # noqa: PLC0415

    path = make_random_adapter(tmp_path / "a", MODEL, rank=4, targets=["q_proj"], seed=0)
    cfg = path / "adapter_config.json"
    raw = json.loads(cfg.read_text())
    raw["base_model_name_or_path"] = "someone/Other-Model-7B"
    cfg.write_text(json.dumps(raw))
    store = AdapterStore(dataclasses.replace(MODEL, name="tiny"), torch.float32, 0)
    with caplog.at_level(logging.WARNING, logger="loraserve.adapters.peft"):
        store.register("a", path)
        assert caplog.text.count("Other-Model-7B") == 1
        cfg.write_text("{not json")  # edited since: the registered config still serves
        assert store.get("a").rank(0, "q_proj") == 4
        assert store.get("a").rank(1, "q_proj") == 4  # (host budget 0: read again)
        assert store.stats.disk_loads == 2
    assert caplog.text.count("Other-Model-7B") == 1
