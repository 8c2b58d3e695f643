"""A tiny random Llama (no tokenizer: prompts are token ids) shared by the bench tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.engine.args import EngineArgs


def make_tiny_llama(path: Path) -> Path:
    """2 layers, hidden 48, GQA 4/2, vocab 211; weights large enough for peaky logits (few
    greedy near-ties, so two exact paths give the same tokens)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=211,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("bench-models") / "tiny-llama")


@pytest.fixture
def engine_args(tiny_model) -> EngineArgs:
    return EngineArgs(
        model=str(tiny_model), dtype="float32", device="cpu", num_pages=256, max_lora_rank=16
    )
