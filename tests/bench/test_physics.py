"""The decode byte floor and the LoRA extra-time estimate (bench/physics.py)."""

from __future__ import annotations

import pytest

from loraserve.bench.physics import (
    HBM_BYTES_PER_S,
    DecodeStats,
    lora_extra,
    throughput_at_adapter_floor,
)


def _decode(ms: float, kv: float, adapters: float, weights: float = 10e9) -> dict:
    stats = DecodeStats(int(weights))
    for i in range(4):
        stats.add(ms / 1e3, 32, int(kv), int(adapters), 10 + i)
    return stats.as_dict()


def test_floor_is_the_bytes_at_the_h200_rate():
    d = _decode(5.0, kv=2e9, adapters=1e9)
    assert d["floor_ms"] == pytest.approx(1e3 * 13e9 / HBM_BYTES_PER_S)
    assert d["adapter_floor_ms"] == pytest.approx(1e3 * 1e9 / HBM_BYTES_PER_S)
    assert d["measured_over_floor"] == pytest.approx(5.0 / d["floor_ms"])
    assert d["avg_distinct_adapters"] == pytest.approx(11.5)


def test_lora_extra_models_the_run_without_adapters_at_base_rate():
    base = _decode(6.0, kv=2e9, adapters=0)  # 12 GB in 6 ms: 2e9 bytes per ms
    run = _decode(10.0, kv=4e9, adapters=1e9)  # 14 GB -> 7 ms without adapters
    extra = lora_extra(run, base)
    assert extra["base_bytes_per_ms"] == pytest.approx(2e9)
    assert extra["modelled_without_lora_ms"] == pytest.approx(7.0)
    assert extra["extra_ms"] == pytest.approx(3.0)
    assert extra["extra_over_adapter_floor"] == pytest.approx(3.0 / run["adapter_floor_ms"])
    assert extra["decode_ratio"] == pytest.approx(0.7)
    floor = run["adapter_floor_ms"]
    assert extra["decode_ratio_at_adapter_floor"] == pytest.approx(7.0 / (7.0 + floor))
    assert lora_extra(base, base) is None  # no adapter bytes
    assert lora_extra(run, DecodeStats(1).as_dict()) is None  # base had no decode steps


def test_throughput_at_adapter_floor_takes_the_excess_off_every_step_with_decode_rows():
    extra = {"extra_ms": 3.0, "adapter_floor_ms": 1.0}  # 2 ms too slow per step
    steps = {
        "decode": {"steps": 1000},
        "mixed": {"steps": 400},
        "changed": {"steps": 100},
        "empty": {"steps": 99},
    }
    run = {"completed": 100, "wall_time_s": 10.0, "steps": steps}
    assert throughput_at_adapter_floor(run, extra) == pytest.approx(100 / (10.0 - 3.0))
    faster = {"extra_ms": 0.5, "adapter_floor_ms": 1.0}  # already under its floor: as run
    assert throughput_at_adapter_floor(run, faster) == pytest.approx(10.0)
    assert throughput_at_adapter_floor({"completed": 1, "wall_time_s": 1.0}, extra) is None
