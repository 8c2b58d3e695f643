"""Building the model on a device and filling its weights: from an HF directory of
safetensors (one file, or shards with an index), or random (``dummy``) for benchmarks."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from loraserve.config import ModelConfig, RopeScaling
from loraserve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# Model shapes without weights: S-LoRA's settings and Llama-3-8B (dummy load format).
PRESETS: dict[str, ModelConfig] = {
    "llama-7b": ModelConfig(32000, 4096, 11008, 32, 32, 32, 128, name="llama-7b"),
    "llama-13b": ModelConfig(32000, 5120, 13824, 40, 40, 40, 128, name="llama-13b"),
    # ANCHORS.md's S5 shape: hidden 7168 (56 heads of 128).
    "llama-30b": ModelConfig(32000, 7168, 19200, 60, 56, 56, 128, name="llama-30b"),
    "llama-70b": ModelConfig(32000, 8192, 28672, 80, 64, 8, 128, name="llama-70b"),
    "llama-3-8b": ModelConfig(
        128256,
        4096,
        14336,
        32,
        32,
        8,
        128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope=RopeScaling(theta=500000.0),
        eos_token_ids=(128001, 128009),
        bos_token_id=128000,
        name="llama-3-8b",
    ),
}

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_PACKED = {
    "self_attn.q_proj": ("attn.qkv", "q_proj"),
    "self_attn.k_proj": ("attn.qkv", "k_proj"),
    "self_attn.v_proj": ("attn.qkv", "v_proj"),
    "self_attn.o_proj": ("attn.o_proj", "o_proj"),
    "mlp.gate_proj": ("mlp.gate_up", "gate_proj"),
    "mlp.up_proj": ("mlp.gate_up", "up_proj"),
    "mlp.down_proj": ("mlp.down_proj", "down_proj"),
}
_NORMS = {"input_layernorm", "post_attention_layernorm"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def build_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    max_positions: int,
) -> LlamaForCausalLM:
    """The model with uninitialised weights, allocated directly on ``device``."""
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(config, max_positions)
        finally:
            torch.set_default_dtype(default)
    return model.eval()


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF directory; raises naming what is missing."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} is named in {index.name} but missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {model_dir}: loraserve loads HF safetensors checkpoints "
            "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for f in safetensors_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as reader:
                for name in reader.keys():
                    yield name, reader.get_tensor(name), f
        except Exception as e:
            if isinstance(e, (KeyError, ValueError, FileNotFoundError)):
                raise
            raise ValueError(f"cannot read {f}: {e}") from e


def load_weights(model: LlamaForCausalLM, model_dir: Path) -> None:
    """Fill every parameter from the checkpoint; raises naming missing/unknown tensors."""
    expected = expected_names(model.config)
    seen: set[str] = set()
    for name, tensor, file in iter_checkpoint(model_dir):
        if _IGNORED.search(name):
            continue
        if name == "lm_head.weight" and model.lm_head is None:
            continue  # tied: some checkpoints store the copy anyway
        if name not in expected:
            raise ValueError(
                f"{file.name}: unexpected tensor {name!r} for {model.config.architecture}"
            )
        try:
            _load_one(model, name, tensor)
        except ValueError as e:
            raise ValueError(f"{file.name}: tensor {name!r} does not fit the config: {e}") from e
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint in {model_dir} is missing tensors: {missing[:3]}{more}")


def expected_names(config: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {p + f"{n}.weight" for n in _NORMS}
        names |= {p + f"{proj}.weight" for proj in _PACKED}
        biased = {
            "self_attn.q_proj": config.qkv_bias,
            "self_attn.k_proj": config.qkv_bias,
            "self_attn.v_proj": config.qkv_bias,
            "self_attn.o_proj": config.o_bias,
            "mlp.gate_proj": config.mlp_bias,
            "mlp.up_proj": config.mlp_bias,
            "mlp.down_proj": config.mlp_bias,
        }
        names |= {p + f"{proj}.bias" for proj, has in biased.items() if has}
    return names


def _load_one(model: LlamaForCausalLM, name: str, tensor: torch.Tensor) -> None:
    if name == "model.embed_tokens.weight":
        _copy(model.embed_tokens.weight, tensor, name)
    elif name == "model.norm.weight":
        _copy(model.norm.weight, tensor, name)
    elif name == "lm_head.weight":
        _copy(model.lm_head, tensor, name)
    else:
        layer_idx, module, param = _LAYER.match(name).groups()
        layer = model.layers[int(layer_idx)]
        if module in _NORMS:
            _copy(getattr(layer, module).weight, tensor, name)
        else:
            path, projection = _PACKED[module]
            layer.get_submodule(path).load(projection, param, tensor)


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
    param.data.copy_(tensor)


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0, gain: float = 0.25) -> None:
    """Random weights for benchmarks. Projections have a gain of 1/4 (uniform with variance
    1/(16 in_features)), so each layer adds a small branch to a residual stream that the
    token embedding (unit variance) still dominates after 80 layers: rounding differences
    shrink through the layers instead of growing as in a unit-gain random network. The LM
    head gives logits of spread ~4, so greedy decoding has clear winners and two numerically
    different paths (Triton vs torch kernels in bf16) can be compared token by token."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            bound = (3.0 / param.shape[-1]) ** 0.5
            if name == "embed_tokens.weight":
                bound = 3.0**0.5
            elif name == "lm_head":
                bound *= 4.0
            else:
                bound *= gain
            param.data.uniform_(-bound, bound, generator=gen)
