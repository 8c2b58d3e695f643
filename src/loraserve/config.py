"""Frozen configuration dataclasses. Each validates itself in ``__post_init__``.

``ModelConfig`` is read from an HF ``config.json`` (or built from a named preset for
dummy weights); ``CacheConfig`` sizes the page pool; ``SchedulerConfig`` bounds a step;
``EngineConfig`` composes them with the device and dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# The linear layers a LoRA adapter may target, in the order kernels and tables index them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_mask(targets) -> int:
    """Bit i set for each target LORA_TARGETS[i] in ``targets``."""
    return sum(1 << LORA_TARGETS.index(t) for t in set(targets))


ALL_TARGETS = target_mask(LORA_TARGETS)
QKVO_TARGETS = target_mask(LORA_TARGETS[:4])
# "bmm": S-LoRA's padded ablation (kernels/lora.py lora_apply_bmm), for benchmarks.
LORA_BACKENDS = ("auto", "torch", "triton", "bmm")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use float32, float16 or bfloat16")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency settings: theta, and the optional scaling transform."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"config field rope_scaling.rope_type={self.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model (Llama 2/3, Mistral, Qwen2, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, f) <= 0:
                raise ValueError(f"config field {f} must be positive, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config field num_attention_heads={self.num_attention_heads} must be a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def lora_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target projection."""
        h, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return shapes[target]

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{cfg_file} not found: a model directory needs an HF config.json "
                "(as written by transformers' save_pretrained)"
            )
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_hf_dict(raw, name=path.name, generation_config=gen)

    @classmethod
    def from_hf_dict(
        cls,
        raw: dict[str, Any],
        name: str = "",
        generation_config: dict[str, Any] | None = None,
    ) -> ModelConfig:
        arch = _architecture(raw)
        _reject_sliding_window(raw)
        hidden = _required(raw, "hidden_size")
        heads = _required(raw, "num_attention_heads")
        head_dim = raw.get("head_dim") or hidden // heads
        eos = _ids(raw.get("eos_token_id")) | _ids((generation_config or {}).get("eos_token_id"))
        return cls(
            vocab_size=_required(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required(raw, "intermediate_size"),
            num_hidden_layers=_required(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope=_rope(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            o_bias=arch != "Qwen2ForCausalLM" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            architecture=arch,
            eos_token_ids=tuple(sorted(eos)),
            bos_token_id=raw.get("bos_token_id"),
            name=name or raw.get("_name_or_path", ""),
        )


def _required(raw: dict[str, Any], key: str) -> Any:
    if key not in raw:
        raise ValueError(f"config.json has no field {key!r}, which a Llama-family model needs")
    return raw[key]


def _ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    model_type = raw.get("model_type")
    for a, t in SUPPORTED_ARCHITECTURES.items():
        if not archs and model_type == t:
            return a
    raise ValueError(
        f"config field architectures={archs} (model_type={model_type!r}) is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _reject_sliding_window(raw: dict[str, Any]) -> None:
    window = raw.get("sliding_window")
    use = raw.get("use_sliding_window", raw.get("model_type") == "mistral")
    if window is not None and use:
        raise ValueError(
            f"config field sliding_window={window} is not supported yet (sliding-window "
            "attention); set it to null in config.json if the model never exceeds that length"
        )


def _rope(raw: dict[str, Any]) -> RopeScaling:
    """Reads rope_theta/rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kw: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        if params.get(key) is not None:
            kw[key] = params[key]
    return RopeScaling(**kw)


@dataclass(frozen=True)
class CacheConfig:
    """How the one page pool is sized and cut.

    A page holds ``block_size`` tokens of K and V for every layer (see memory/pool.py).
    The pool size comes from exactly one of: ``num_pages``; ``pool_bytes``; or, on CUDA,
    ``gpu_memory_utilization`` of the device's memory minus what is already in use.
    """

    block_size: int = 16
    num_pages: int | None = None
    pool_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_pool_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {self.num_pages}")
        if self.pool_bytes is not None and self.pool_bytes <= 0:
            raise ValueError(f"pool_bytes must be positive, got {self.pool_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Bounds on one engine step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # Seconds a new prompt may be held while every running request decodes, so that prompts
    # arriving close together share one prefill step (0: admit at once).
    prefill_batch_window: float = 0.0
    # Fail a request that has waited this long without starting (S-LoRA's early abort: it
    # can no longer meet a first-token deadline, and the capacity goes to those that can).
    ttft_deadline: float | None = None
    # With the batch (nearly) full and prompts waiting, let new prompts join at most once per
    # this many seconds, unless max_num_seqs / 8 sequence slots are free: at saturation every
    # finished request would otherwise turn the next graphed decode step into a mixed one.
    admission_interval: float = 0.0

    def __post_init__(self) -> None:
        if self.admission_interval < 0:
            raise ValueError(
                f"admission_interval must be >= 0 seconds, got {self.admission_interval}"
            )
        if self.ttft_deadline is not None and self.ttft_deadline <= 0:
            raise ValueError(f"ttft_deadline must be > 0 seconds, got {self.ttft_deadline}")
        if self.prefill_batch_window < 0:
            raise ValueError(
                f"prefill_batch_window must be >= 0 seconds, got {self.prefill_batch_window}"
            )
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter tiers: at most ``max_loras`` resident in the pool at once, ranks up to
    ``max_lora_rank``; a host-memory LRU of ``host_cache_bytes`` in front of the disk.
    ``adapter_pool_bytes`` (S-LoRA's "separate buffers" ablation) gives adapters a pool of
    their own, cut out of the page pool's budget; None: one unified pool."""

    max_loras: int = 512  # EngineArgs: 2 x max_num_seqs
    max_lora_rank: int = 64
    host_cache_bytes: int = 8 << 30
    prefetch: int = 16  # adapters of queued requests to prefetch per step
    adapter_pool_bytes: int | None = None
    io_threads: int | None = None  # threads reading and packing adapters; None: by cores
    # an I/O thread that packs an adapter while the engine thread waits for the device loads
    # it into the pool too (AdapterManager.device_wait); False: the engine thread does
    copy_in_wait: bool = True

    def __post_init__(self) -> None:
        if self.max_loras <= 0:
            raise ValueError(f"max_loras must be positive, got {self.max_loras}")
        if self.max_lora_rank <= 0:
            raise ValueError(f"max_lora_rank must be positive, got {self.max_lora_rank}")
        if self.host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, got {self.host_cache_bytes}")
        if self.adapter_pool_bytes is not None and self.adapter_pool_bytes <= 0:
            raise ValueError(f"adapter_pool_bytes must be positive, got {self.adapter_pool_bytes}")
        if self.io_threads is not None and self.io_threads <= 0:
            raise ValueError(f"adapter_io_threads must be positive, got {self.io_threads}")
        if self.prefetch < 0:
            raise ValueError(f"adapter_prefetch must be >= 0 (0: off), got {self.prefetch}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_model_len: int = 4096
    attention_backend: str = "auto"
    lora_backend: str = "auto"
    seed: int = 0
    cuda_graph_max_batch: int = 0  # 0: eager decode; N: decode batches up to N padded/graphed
    # Graphed decode steps that continue unchanged are queued one step ahead, so the host's
    # work for a step overlaps the device's work on the one before (LLMEngine._launch_next).
    overlap_steps: bool = False
    # With overlap_steps: a step that admits prompts is queued ahead too (its decode rows from
    # the device's samples, its prompts as prefill graphs), when their adapters are ready.
    overlap_admission: bool = False
    # The prompt rows of a step replayed as padded CUDA graphs (engine/prefill_graphs.py).
    prefill_graphs: bool = False
    # Decode graphs run each adapter's rows as one LoRA segment (engine/graphs.py).
    group_lora_rows: bool = True
    # The LoRA shrink on a second CUDA stream beside the base GEMM (PackedLinear).
    lora_side_stream: bool = False
    # The decode LoRA expand packs small ranks' B^T rows of several tiles per load.
    lora_rank_pack: bool = False
    # Decode LoRA of steps whose adapters all have ranks <= 16: shrink and expand in one
    # launch, a program per (row, target) (with max_lora_rank > 16: graph steps only).
    lora_fused_decode: bool = True
    # ... for steps whose adapters all have ranks up to this (16 measured on an H200).
    lora_fused_max_rank: int = 16
    # In a step that also prefills, at least this many decode rows replay the decode graphs
    # apart from the prompt rows (ModelRunner._launch_split); 0: every row runs eagerly.
    mixed_decode_graphs: int = 0

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}"
            )
        if self.lora_backend not in LORA_BACKENDS:
            raise ValueError(
                f"lora_backend must be one of {', '.join(LORA_BACKENDS)}, got {self.lora_backend!r}"
            )
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.lora_fused_max_rank < 1:
            raise ValueError(
                f"lora_fused_max_rank must be >= 1, got {self.lora_fused_max_rank}: to run "
                "decode LoRA in two launches at every rank, turn fused decode off "
                "(--no-lora-fused-decode)"
            )
        if self.prefill_graphs and self.cuda_graph_max_batch <= 0:
            raise ValueError(
                "prefill_graphs needs the decode graphs (cuda_graph_max_batch > 0): drop "
                "--prefill-graphs or set --cuda-graph-max-batch"
            )
        if self.mixed_decode_graphs < 0:
            raise ValueError(
                f"mixed_decode_graphs must be >= 0 (0: off), got {self.mixed_decode_graphs}"
            )
