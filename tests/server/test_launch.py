"""Pieces of ``loraserve serve`` that need no server: demo adapters and the served name."""

from __future__ import annotations

from loraserve.adapters.peft import read_adapter_config
from loraserve.config import ModelConfig
from loraserve.server.launch import DEMO_ADAPTERS, ensure_demo_adapters, served_model_name


def test_demo_adapters_are_written_once(model_dir, tmp_path):
    config = ModelConfig.from_dir(model_dir)
    paths = ensure_demo_adapters(config, tmp_path)
    assert sorted(paths) == sorted(DEMO_ADAPTERS)
    for name, path in paths.items():
        assert read_adapter_config(path).r == DEMO_ADAPTERS[name][0]
    stamps = {p: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in paths.values()}
    assert ensure_demo_adapters(config, tmp_path) == paths
    assert stamps == {
        p: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in paths.values()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_served_model_name(tmp_path):
    assert served_model_name(None) == "SmolLM2-135M-Instruct"
    assert served_model_name(str(tmp_path / "my-model") + "/") == "my-model"
