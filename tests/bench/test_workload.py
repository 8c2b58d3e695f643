"""The trace: S-LoRA's draws, reproducible, with the distributions it promises."""

from __future__ import annotations

import numpy as np
import pytest

from loraserve.bench.workload import (
    SETTINGS,
    WorkloadConfig,
    adapter_name,
    adapter_rank,
    generate_trace,
    parse_targets,
    prompt_token_ids,
)
from loraserve.config import LORA_TARGETS


def test_same_seed_same_trace_other_seed_other_trace():
    config = WorkloadConfig(num_adapters=50, rate=5, duration=20)
    assert generate_trace(config) == generate_trace(config)
    other = generate_trace(WorkloadConfig(num_adapters=50, rate=5, duration=20, seed=7))
    assert other != generate_trace(config)


def test_matches_slora_generate_requests():
    """S-LoRA's trace.py: np.random.seed(seed), then power, randint, randint, gamma."""
    n, alpha, rate, cv, duration = 30, 0.5, 4.0, 2.0, 25
    np.random.seed(42)
    total = int(rate * duration)
    ind = (np.random.power(alpha, total) * n).astype(int)
    input_lens = np.random.randint(8, 512, total)
    output_lens = np.random.randint(8, 512, total)
    arrivals = np.cumsum(np.random.gamma(1 / (cv * cv), cv * cv / rate, total))
    trace = generate_trace(WorkloadConfig(n, alpha, rate, cv, duration))
    assert [t.adapter for t in trace] == ind.tolist()
    assert [t.input_len for t in trace] == input_lens.tolist()
    assert [t.output_len for t in trace] == output_lens.tolist()
    assert [t.arrival for t in trace] == arrivals.tolist()


def test_arrival_count_and_poisson_gaps():
    trace = generate_trace(WorkloadConfig(num_adapters=10, rate=50, duration=400))
    assert len(trace) == 20000
    arrivals = np.array([t.arrival for t in trace])
    gaps = np.diff(arrivals, prepend=0.0)
    assert (gaps > 0).all()
    # cv = 1: exponential gaps, mean = std = 1/rate
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)
    assert arrivals[-1] == pytest.approx(400, rel=0.05)


def test_cv_sets_burstiness():
    gaps = np.diff(
        [t.arrival for t in generate_trace(WorkloadConfig(10, rate=20, cv=3, duration=500))]
    )
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.15)
    assert gaps.std() / gaps.mean() == pytest.approx(3, rel=0.15)


def test_alpha_one_is_uniform_small_alpha_skews_low():
    n = 20
    uniform = np.bincount(
        [t.adapter for t in generate_trace(WorkloadConfig(n, 1.0, 100, duration=200))], minlength=n
    )
    assert uniform.min() > 0.8 * 1000 and uniform.max() < 1.2 * 1000
    skewed = [t.adapter for t in generate_trace(WorkloadConfig(n, 0.1, 100, duration=200))]
    counts = np.bincount(skewed, minlength=n)
    assert counts[0] > 0.5 * len(skewed)  # P(X < 1/20) = (1/20)^0.1 = 0.74
    assert counts[0] > counts[1] > counts[n // 2]
    assert np.mean(skewed) < 0.25 * n
    assert max(skewed) < n


def test_lengths_within_ranges():
    trace = generate_trace(
        WorkloadConfig(5, rate=100, duration=20, input_range=(4, 9), output_range=(30, 32))
    )
    assert {t.input_len for t in trace} == set(range(4, 9))
    assert {t.output_len for t in trace} == {30, 31}


def test_ranks_round_robin_and_names():
    ranks = SETTINGS["S2"].ranks
    assert [adapter_rank(i, ranks) for i in range(6)] == [64, 32, 16, 8, 64, 32]
    assert adapter_name(7) == "adapter-0007" and adapter_name(12345) == "adapter-12345"
    assert SETTINGS["S4"] == ("llama-13b", (64, 32, 16))


def test_prompts_are_reproducible_token_ids():
    trace = generate_trace(WorkloadConfig(5, rate=10, duration=2))
    a = prompt_token_ids(trace[3], 211, 42)
    assert a == prompt_token_ids(trace[3], 211, 42) != prompt_token_ids(trace[4], 211, 42)
    assert len(a) == trace[3].input_len and all(0 <= t < 211 for t in a)


def test_targets_and_bad_configs():
    assert parse_targets("qkvo") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert parse_targets("all") == LORA_TARGETS
    assert parse_targets("v_proj,q_proj") == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="targets"):
        parse_targets("qkv")
    with pytest.raises(ValueError, match="-n"):
        WorkloadConfig(0)
    with pytest.raises(ValueError, match="input-range"):
        WorkloadConfig(3, input_range=(9, 9))
