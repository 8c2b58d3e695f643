"""Test setup: Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any kernel is defined, so it is set here, before
loraserve is imported by any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def make_tiny_model(
    path: Path,
    *,
    arch: str = "llama",
    vocab_size: int = 211,
    hidden_size: int = 48,
    intermediate_size: int = 96,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
    seed: int = 0,
    **extra,
) -> Path:
    """A random HF Llama/Qwen2/Mistral model saved with save_pretrained (safetensors)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    if head_dim is not None:
        common["head_dim"] = head_dim
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **common)
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(attention_bias=attention_bias, **common)
        model = transformers.LlamaForCausalLM(config)
    # Larger-than-default weights make logits peaky, so greedy ties are rare.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[str, Path] = {}

    def factory(**kw) -> Path:
        key = repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp("model"), **kw)
        return cache[key]

    return factory
