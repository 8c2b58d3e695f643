"""The bench's sampling profiler of the engine thread (bench/hostprof.py)."""

from __future__ import annotations

import time

import pytest

from loraserve.bench.adapters import register_adapters
from loraserve.bench.hostprof import StackSampler, format_profile
from loraserve.bench.runner_inproc import ENGINE_STEP, InprocDriver, RunOptions
from loraserve.bench.suite import bench_requests
from loraserve.bench.workload import QKVO, WorkloadConfig


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _outer(seconds: float) -> None:
    _spin(seconds)


def test_sampler_files_samples_by_kind_and_finds_the_busy_function():
    sampler = StackSampler(interval=0.001).start()
    _outer(0.3)
    sampler.flush("busy")
    time.sleep(0.1)
    sampler.flush("idle")
    profile = sampler.stop()
    busy = profile["kinds"]["busy"]
    assert busy["samples"] >= 20  # (a thread spinning in Python yields the GIL every 5 ms)
    leaf = dict(busy["leaf"])
    inclusive = dict(busy["inclusive"])
    name = next(n for n in leaf if n.endswith(":_spin"))
    assert leaf[name] > 0.8 and inclusive[name] > 0.8  # nearly every sample is in _spin
    assert any(n.endswith(":_outer") for n in inclusive)  # ... called from _outer
    assert not any(n.endswith(":_spin") for n in dict(profile["kinds"]["idle"]["leaf"]))
    text = format_profile(profile)
    assert "host profile of busy steps" in text and "_spin" in text
    with pytest.raises(ValueError, match="interval"):
        StackSampler(interval=0)


def test_driver_reports_a_host_profile_per_step_kind(engine_args):
    engine = engine_args.create_engine()
    register_adapters(engine, 2, (4,), QKVO)
    workload = WorkloadConfig(2, rate=20, duration=0.5, input_range=(4, 8), output_range=(8, 12))
    requests = bench_requests(workload, engine.config.model.vocab_size, None)
    options = RunOptions(progress=False, host_profile=True)
    result = InprocDriver(engine, requests, options).run().result()
    kinds = result["host_profile"]["kinds"]
    assert "mixed" in kinds or "decode" in kinds
    for counts in kinds.values():
        # Only samples inside the engine's step count, from it inward.
        inclusive = dict(counts["inclusive"])
        assert inclusive[ENGINE_STEP] == 1.0
        assert not any("runner_inproc" in n for n in inclusive)
    plain = InprocDriver(engine, requests, RunOptions(progress=False)).run().result()
    assert "host_profile" not in plain
