"""The decode probe: a run's average decode step timed with and without LoRA."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from loraserve.bench.adapters import register_adapters
from loraserve.bench.physics import HBM_BYTES_PER_S
from loraserve.bench.probe import decode_probe
from loraserve.bench.workload import QKVO, adapter_name
from loraserve.cli import main
from loraserve.memory.pool import PageKind

from .test_cli import TINY


def test_probe_times_the_batch_with_and_without_its_adapters(engine_args):
    engine = engine_args.create_engine()
    register_adapters(engine, 4, (8, 4), QKVO)
    names = [adapter_name(i) for i in range(4)]
    loads = engine.adapter_cache.stats.gpu_loads
    batches = []  # the adapters of each step's rows
    launch = engine.runner.launch
    engine.runner.launch = lambda b: batches.append([r.adapter for r in b.requests]) or launch(b)
    # 5 rows over 3 distinct adapters (a name given twice counts once)
    p = decode_probe(engine, [names[0], names[1], names[0], names[2]], 5, 12, steps=3)
    assert (p["batch"], p["context"], p["distinct_adapters"], p["steps"]) == (5, 12, 3, 3)
    assert engine.adapter_cache.stats.gpu_loads - loads == 3
    # decode steps of the 5 rows on the 3 adapters in turn, then of 5 rows on none
    lora = [names[0], names[1], names[2], names[0], names[1]]
    assert batches.count(lora) >= 3 and batches.count([None] * 5) >= 3
    assert all(b in (lora, [None] * 5) for b in batches)
    nbytes = sum(engine.adapter_store.nbytes(n) for n in names[:3])
    assert p["adapter_bytes"] == nbytes
    assert p["adapter_floor_ms"] == pytest.approx(1e3 * nbytes / HBM_BYTES_PER_S)
    assert p["with_lora_ms"] > 0 and p["without_lora_ms"] > 0
    assert p["extra_ms"] == pytest.approx(p["with_lora_ms"] - p["without_lora_ms"])
    assert p["extra_over_adapter_floor"] == pytest.approx(p["extra_ms"] / p["adapter_floor_ms"])
    assert p["decode_ratio"] == pytest.approx(p["without_lora_ms"] / p["with_lora_ms"])
    # every probe request is gone, and with it its KV pages
    assert not engine.has_unfinished()
    assert engine.pool.num_used(PageKind.KV) == 0
    engine.check_integrity()


def test_probe_says_why_it_skipped(engine_args):
    engine = dataclasses.replace(engine_args, max_loras=128).create_engine()
    register_adapters(engine, 130, (8,), QKVO)
    names = [adapter_name(0), adapter_name(1)]
    assert "no decode steps" in decode_probe(engine, [], 4, 8)["skipped"]
    many = [adapter_name(i) for i in range(130)]
    assert "130 adapters > max_loras 128" in decode_probe(engine, many, 130, 8)["skipped"]
    too_many = engine.config.scheduler.max_num_seqs + 1
    assert "max_num_seqs" in decode_probe(engine, names, too_many, 8)["skipped"]
    # 256 pages of 16 tokens: 40 rows of 200 tokens cannot all be in the pool at once; the
    # first ones admitted run to their last token while the rest wait for pages
    skipped = decode_probe(engine, names, 40, 200, steps=2, timeout_s=30)["skipped"]
    assert "of 40 rows running" in skipped and "ended before decoding" in skipped
    assert ": length)" in skipped
    assert not engine.has_unfinished() and engine.pool.num_used(PageKind.KV) == 0
    engine.check_integrity()


def test_bench_reports_the_probe_of_its_loraserve_runs(tiny_model, tmp_path, capsys):
    out = tmp_path / "probe.json"
    args = ["bench", "--model", str(tiny_model), "--ranks", "8", "-n", "3", *TINY]
    assert main([*args, "--baselines", "base", "--decode-probe", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["points"][0]["runs"]
    decode, probe = runs["loraserve"]["decode"], runs["loraserve"]["decode_probe"]
    assert probe["batch"] == round(decode["avg_batch"])
    assert probe["distinct_adapters"] == round(decode["avg_distinct_adapters"])
    assert probe["with_lora_ms"] > 0 and probe["adapter_bytes"] > 0
    assert "decode_probe" not in runs["base"]
    assert "decode probe (this engine, batch" in capsys.readouterr().err
    assert main([*args, "--out", str(out)]) == 0  # off by default
    assert "decode_probe" not in json.loads(out.read_text())["points"][0]["runs"]["loraserve"]


def test_probe_waits_for_slow_adapters_before_queueing_rows(engine_args):
    """Adapters that take a while to read (the I/O threads on a GPU): rows queued at once
    would start apart, and the first would reach their last token before the batch formed."""
    engine = engine_args.create_engine()
    register_adapters(engine, 3, (8,), QKVO)
    names = [adapter_name(i) for i in range(3)]
    pack = engine.adapters._pack

    def slow_pack(name):
        if name != names[0]:
            time.sleep(0.5)
        return pack(name)

    engine.adapters._pack = slow_pack
    p = decode_probe(engine, names, 3, 8, steps=2)
    assert "skipped" not in p, p
    assert p["distinct_adapters"] == 3 and p["with_lora_ms"] > 0


def test_probe_flag_conflicts_are_named():
    from loraserve.bench.options import config_from_cli
    from loraserve.cli import build_parser

    parser = build_parser()
    base = ["bench", "--setting", "S1", "--decode-probe"]
    assert config_from_cli(parser.parse_args(base)).decode_probe
    with pytest.raises(ValueError, match="--decode-probe .* not with --url"):
        config_from_cli(parser.parse_args([*base, "--url", "http://localhost:8000"]))
    with pytest.raises(ValueError, match="--decode-probe and --host-profile"):
        config_from_cli(parser.parse_args([*base, "--host-profile"]))
