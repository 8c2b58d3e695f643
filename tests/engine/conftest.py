"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def graph_setup(tiny_model_factory, tmp_path_factory):
    """A tiny GQA model and two adapters on different targets: "a" on q_proj, v_proj (rank
    4), "b" on o_proj, down_proj (rank 8)."""
    from loraserve.adapters.peft import make_random_adapter
    from loraserve.config import ModelConfig

    model_dir = tiny_model_factory(num_attention_heads=4, num_key_value_heads=2)
    config = ModelConfig.from_dir(model_dir)
    root = tmp_path_factory.mktemp("graph-adapters")
    adapters = {
        "a": make_random_adapter(root / "a", config, 4, ["q_proj", "v_proj"], seed=1),
        "b": make_random_adapter(root / "b", config, 8, ["o_proj", "down_proj"], seed=2),
    }
    return model_dir, adapters
