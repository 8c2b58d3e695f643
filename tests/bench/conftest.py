"""A tiny random Llama (no tokenizer: prompts are token ids) shared by the bench tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.engine.args import EngineArgs


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> Path:
    return tiny_model_factory()


@pytest.fixture
def engine_args(tiny_model) -> EngineArgs:
    return EngineArgs(
        model=str(tiny_model), dtype="float32", device="cpu", num_pages=256, max_lora_rank=16
    )
