"""``loraserve bench`` end to end on the CPU: a sweep, baselines, JSON and PNG."""

from __future__ import annotations

import json

import pytest

from loraserve.bench.options import config_from_cli
from loraserve.cli import build_parser, main

TINY = ["--rate", "10", "--duration", "0.4", "--input-range", "4,10", "--output-range", "4,10"]
TINY += ["--dtype", "float32", "--device", "cpu", "--num-pages", "256", "--no-progress"]


def test_sweep_writes_json_and_png(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(tiny_model), "--ranks", "8,4", "-n", "2,4", *TINY]
    args += ["--baselines", "base,padded,separate", "--out", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert results["sweep"] == "n" and [p["n"] for p in results["points"]] == [2, 4]
    for point in results["points"]:
        assert set(point["runs"]) == {"loraserve", "base", "padded", "separate"}
        for run in point["runs"].values():
            assert run["completed"] == run["issued"] == point["num_requests"] == 4
        runs = point["runs"]
        assert runs["padded"]["engine"]["lora_backend"] == "bmm"
        separate = runs["separate"]["engine"]
        assert separate["adapter_pool_bytes"] == pytest.approx(
            0.1 * runs["loraserve"]["engine"]["pool_bytes"], rel=0.05
        )
        assert separate["pool_bytes"] < runs["loraserve"]["engine"]["pool_bytes"]
        assert runs["base"]["adapter_loads"]["gpu_loads"] == 0
        names = {"base", "padded", "separate"}
        assert set(point["loraserve_over"]) == names | {f"{n}_tok_s" for n in names}
        ours = runs["loraserve"]["throughput_req_s"]
        assert point["loraserve_over"]["base"] == ours / runs["base"]["throughput_req_s"]
        assert runs["base"]["pool_peak"]["adapter_pages"] == 0
    config = results["config"]
    assert config["ranks"] == [8, 4] and config["engine"]["max_lora_rank"] == 8
    png = out.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Arrivals and lengths do not depend on n: one base run serves the whole sweep.
    first, second = (p["runs"]["base"] for p in results["points"])
    assert "reused_from_n" not in first and second["reused_from_n"] == 2
    assert second["throughput_req_s"] == first["throughput_req_s"]
    err = capsys.readouterr().err
    assert "n=4 rate=10 separate:" in err and "decode step" in err
    assert "admission: " in err and " requests (" in err and "waiting for its adapter" in err
    assert "; engine started in " in err


def test_one_engine_serves_a_sweep_and_its_base_runs(tiny_model, tmp_path, monkeypatch):
    """Start-up is paid once: the n sweep and the base run share one engine, and each run
    starts as a fresh engine would (no adapter left in the pool from the run before)."""
    from loraserve.engine.args import EngineArgs

    created = []
    real = EngineArgs.create_engine

    def create_engine(self):
        created.append(self)
        return real(self)

    monkeypatch.setattr(EngineArgs, "create_engine", create_engine)
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(tiny_model), "--ranks", "8,4", "-n", "2,4", *TINY]
    args += ["--baselines", "base", "--out", str(out), "--rate", "20"]
    assert main(args) == 0
    assert len(created) == 1
    points = json.loads(out.read_text())["points"]
    first, second = (p["runs"] for p in points)
    assert first["base"]["pool_peak"]["adapter_pages"] == 0  # after the adapter run
    for runs in (first, second):
        loads = runs["loraserve"]["adapter_loads"]
        # Cold for each n: every adapter the run served was loaded in it.
        assert loads["gpu_loads"] == loads["distinct_adapters_served"] > 0
        assert runs["loraserve"]["completed"] == runs["loraserve"]["issued"]
        if runs["loraserve"]["decode"]["decode_steps"] and runs["base"]["decode"]["decode_steps"]:
            extra = runs["loraserve"]["lora_extra"]  # decode time over base's, vs adapter bytes
            assert extra["adapter_floor_ms"] > 0 and "extra_over_adapter_floor" in extra
    # The start-up is recorded where it was paid: the first run's; the others reused it.
    assert first["loraserve"]["engine_start_s"] > 0
    assert first["base"]["engine_start_s"] is second["loraserve"]["engine_start_s"] is None


def test_rate_sweep_to_stdout_with_plot(tiny_model, tmp_path, capsys):
    png = tmp_path / "rate.png"
    args = ["bench", "--model", str(tiny_model), "-n", "2", *TINY, "--rate", "4,8"]
    args += ["--max-requests", "3", "--plot", str(png)]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["sweep"] == "rate" and [p["rate"] for p in results["points"]] == [4.0, 8.0]
    assert [p["num_requests"] for p in results["points"]] == [1, 3]  # 4 * 0.4; capped at 3
    assert png.stat().st_size > 1000


def test_settings_and_flag_errors(tiny_model):
    parser = build_parser()
    config = config_from_cli(parser.parse_args(["bench", "--setting", "S2", "-n", "5,100,1000"]))
    assert config.engine.model == "llama-7b" and config.engine.load_format == "dummy"
    assert config.ranks == (64, 32, 16, 8) and config.engine.max_lora_rank == 64
    assert config.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert config.num_adapters == (5, 100, 1000) and config.sweep == "n"
    assert config.duration == 300 and config.seed == 42 and config.input_range == (8, 512)
    s4 = config_from_cli(parser.parse_args(["bench", "--setting", "S4", "--targets", "all"]))
    assert s4.engine.model == "llama-13b" and len(s4.targets) == 7
    assert main(["bench"]) == 2  # neither --setting nor --model
    assert main(["bench", "--setting", "S1", "-n", "2,3", "--rate", "1,2"]) == 2
    assert main(["bench", "--setting", "S1", "--baselines", "vllm"]) == 2


def test_preset_with_dummy_weights_and_peft(monkeypatch, tmp_path):
    """The GPU path's shape: a preset (dummy weights, no directory) and the PEFT baseline
    built from the preset's config; here a tiny preset."""
    from loraserve.config import ModelConfig
    from loraserve.model import loader

    tiny = ModelConfig(211, 48, 96, 2, 4, 2, 12, max_position_embeddings=256, name="tiny")
    monkeypatch.setitem(loader.PRESETS, "tiny-preset", tiny)
    from loraserve.engine.args import EngineArgs

    created = []
    real = EngineArgs.create_engine
    monkeypatch.setattr(EngineArgs, "create_engine", lambda a: created.append(a) or real(a))
    out = tmp_path / "preset.json"
    args = ["bench", "--model", "tiny-preset", "--ranks", "8", "-n", "2,3", *TINY]
    args += ["--baselines", "peft", "--peft-batch", "2", "--targets", "all", "--out", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert results["config"]["engine"]["load_format"] == "dummy"
    for point in results["points"]:  # PEFT after all engine runs: one engine for both n
        runs = point["runs"]
        assert runs["loraserve"]["completed"] == runs["peft"]["completed"] == 4
        assert runs["peft"]["adapter_loads"]["peft_added"] >= 1
        ratio = runs["loraserve"]["throughput_req_s"] / runs["peft"]["throughput_req_s"]
        tok = runs["loraserve"]["output_tok_s"] / runs["peft"]["output_tok_s"]
        assert point["loraserve_over"] == {"peft": ratio, "peft_tok_s": tok}
    assert len(created) == 1


def test_peft_only_up_to_peft_max_n(tiny_model, tmp_path):
    out = tmp_path / "capped.json"
    args = ["bench", "--model", str(tiny_model), "-n", "2,3", *TINY, "--max-requests", "2"]
    assert main([*args, "--baselines", "peft", "--peft-max-n", "2", "--out", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [sorted(p["runs"]) for p in points] == [["loraserve", "peft"], ["loraserve"]]


def test_merge_results_of_separate_commands(tiny_model, tmp_path):
    files = []
    for n in ("3", "2"):
        out = tmp_path / f"n{n}.json"
        args = ["bench", "--model", str(tiny_model), "-n", n, *TINY, "--max-requests", "2"]
        assert main([*args, "--out", str(out)]) == 0
        files.append(str(out))
    merged = tmp_path / "all.json"
    assert main(["bench", "--merge", ",".join(files), "--out", str(merged)]) == 0
    results = json.loads(merged.read_text())
    assert results["sweep"] == "n" and [p["n"] for p in results["points"]] == [2, 3]
    assert merged.with_suffix(".png").stat().st_size > 1000


def test_engine_reuse_ignores_a_pinned_page_count_it_already_has(engine_args):
    """The base baseline pins the page count of loraserve's engine (so that a new engine
    would get the same pool): that alone does not start a new engine."""
    import dataclasses

    from loraserve.bench.suite import _Engines

    unpinned = dataclasses.replace(engine_args, num_pages=None, pool_bytes=64 << 20)
    with _Engines() as engines:
        engine = engines.get(unpinned)
        pinned = dataclasses.replace(unpinned, num_pages=engine.pool.num_pages)
        assert engines.get(pinned) is engine
        other = dataclasses.replace(pinned, num_pages=engine.pool.num_pages - 1)
        assert engines.get(other) is not engine and engines.created == 2


def test_variants_run_on_the_same_trace(tiny_model, tmp_path):
    """--variant NAME=FLAGS: loraserve again with other engine options, same trace, ratios
    against the default and the base run."""
    out = tmp_path / "variants.json"
    args = ["bench", "--model", str(tiny_model), "--ranks", "8", "-n", "2", *TINY]
    args += ["--baselines", "base", "--out", str(out)]
    args += ["--variant", "padded=--lora-backend bmm", "--variant", "fifty=--max-num-seqs 50"]
    assert main(args) == 0
    point = json.loads(out.read_text())["points"][0]
    runs = point["runs"]
    assert set(runs) == {"loraserve", "loraserve:padded", "loraserve:fifty", "base"}
    assert runs["loraserve:padded"]["engine"]["lora_backend"] == "bmm"
    assert runs["loraserve:fifty"]["engine"]["max_num_seqs"] == 50
    assert runs["loraserve:fifty"]["engine"]["lora_backend"] == "auto"  # only its flag changed
    for name in ("loraserve:padded", "loraserve:fifty"):
        assert runs[name]["completed"] == runs["loraserve"]["completed"] == 4
        tput = runs[name]["throughput_req_s"]
        assert point["loraserve_over"][f"{name}/base"] == tput / runs["base"]["throughput_req_s"]
    assert set(point["loraserve_over"]) == {
        "base",
        "base_tok_s",
        "loraserve:padded/loraserve",
        "loraserve:padded/base",
        "loraserve:fifty/loraserve",
        "loraserve:fifty/base",
    }
    parser = build_parser()
    for bad in ("nameonly", "x=--no-such-flag", "x=--max-num-seqs lots"):
        with pytest.raises(ValueError, match="--variant"):
            config_from_cli(parser.parse_args(["bench", "--model", "m", "--variant", bad]))
    with pytest.raises(ValueError, match="names must differ"):
        config_from_cli(
            parser.parse_args(["bench", "--model", "m", "--variant", "a=", "--variant", "a="])
        )
