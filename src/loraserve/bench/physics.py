"""The byte floor of a decode step (shared/ANCHORS.md, "The physics of LoRA in decode").

A decode step reads every base weight once, the KV cache of every sequence in the batch,
and every distinct adapter in the batch once. At the H200's measured copy bandwidth
(4.26 TB/s, read + write) that takes at least

    floor = (weight bytes + KV bytes read + distinct adapter bytes) / 4.26e12  seconds

``DecodeStats`` adds up, over the decode-only steps of a run (every scheduled token a
decode), the measured step time and the three byte counts, and reports averages: the
measured step time next to the floor of the same steps. The floor is the H200's; on any
other device (the CPU) the ratio means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraserve.config import ModelConfig

HBM_BYTES_PER_S = 4.26e12  # H200, device-to-device copy (shared/ANCHORS.md)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: all parameters but the embedding table
    (a step reads only its batch's rows of it) unless it is tied to the LM head."""
    embed = getattr(model, "embed_tokens", None)
    skip = set()
    if embed is not None and getattr(model, "lm_head", None) is not None:
        skip.add(id(embed.weight))
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def kv_bytes_per_token(model: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_hidden_layers * model.kv_size * size


@dataclass
class DecodeStats:
    weight_bytes: int
    steps: int = 0
    seconds: float = 0.0
    sequences: int = 0
    kv_bytes: int = 0
    adapter_bytes: int = 0
    adapters: int = 0  # distinct adapters, summed over the steps

    def add(
        self, seconds: float, batch: int, kv_bytes: int, adapter_bytes: int, adapters: int = 0
    ) -> None:
        self.steps += 1
        self.seconds += seconds
        self.sequences += batch
        self.kv_bytes += kv_bytes
        self.adapter_bytes += adapter_bytes
        self.adapters += adapters

    def as_dict(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        floor = (self.weight_bytes + (self.kv_bytes + self.adapter_bytes) / n) / HBM_BYTES_PER_S
        measured = self.seconds / n
        return {
            "decode_steps": self.steps,
            "avg_batch": self.sequences / n,
            # rows per adapter: what the decode LoRA kernels can share (grouped graphs)
            "avg_distinct_adapters": self.adapters / n,
            "measured_ms": 1e3 * measured if self.steps else None,
            "floor_ms": 1e3 * floor if self.steps else None,
            "measured_over_floor": measured / floor if self.steps else None,
            "weight_bytes": self.weight_bytes,
            "avg_kv_bytes": self.kv_bytes / n,
            "avg_adapter_bytes": self.adapter_bytes / n,
            "adapter_floor_ms": 1e3 * self.adapter_bytes / n / HBM_BYTES_PER_S,
            "hbm_bytes_per_s": HBM_BYTES_PER_S,
        }


def lora_extra(decode: dict[str, Any], base: dict[str, Any]) -> dict[str, Any] | None:
    """The decode step time LoRA adds, against its distinct adapter bytes (the issue's
    "extra step time / adapter bytes at 4.26 TB/s" target). The base engine's decode steps
    of the same trace give its rate for weights + KV (bytes per ms); the run's steps without
    adapters are modelled at that rate for their own batch's bytes (the batches differ:
    with adapters the engine is slower, so more requests are in flight). None unless both
    runs have decode steps and the run read adapter bytes.

    Also the step-time ratio without / with LoRA at the run's batch: as measured, and its
    ceiling if LoRA cost only its adapter bytes (``decode_ratio_at_adapter_floor``). With
    every row on its own adapter (alpha = 1 over n = 2000) adapter bytes grow with the batch
    like KV bytes, so this ceiling falls as the batch grows: it bounds what a throughput
    ratio at that operating point can reach from the decode steps."""
    if not decode.get("decode_steps") or not base.get("decode_steps"):
        return None
    if not decode["avg_adapter_bytes"]:
        return None
    rate = (base["weight_bytes"] + base["avg_kv_bytes"]) / base["measured_ms"]
    without = (decode["weight_bytes"] + decode["avg_kv_bytes"]) / rate
    extra = decode["measured_ms"] - without
    return {
        "base_bytes_per_ms": rate,
        "modelled_without_lora_ms": without,
        "extra_ms": extra,
        "adapter_floor_ms": decode["adapter_floor_ms"],
        "extra_over_adapter_floor": extra / decode["adapter_floor_ms"],
        "decode_ratio": without / decode["measured_ms"],
        "decode_ratio_at_adapter_floor": without / (without + decode["adapter_floor_ms"]),
    }


def throughput_at_adapter_floor(run: dict[str, Any], extra: dict[str, Any]) -> float | None:
    """The run's req/s had LoRA cost only its adapter bytes: the same completed requests in
    the wall time less (extra - adapter floor) per step with decode rows (decode steps and
    mixed and changed steps, whose decode rows pay the same LoRA). A what-if from the run's own step
    counts, to set a throughput-ratio target against what the bytes allow; None without
    step counts or a wall time."""
    steps = run.get("steps") or {}
    rows = sum((steps.get(kind) or {}).get("steps", 0) for kind in ("decode", "mixed", "changed"))
    wall = run.get("wall_time_s")
    if not rows or not wall:
        return None
    saved = max(0.0, extra["extra_ms"] - extra["adapter_floor_ms"]) * rows / 1e3
    return run["completed"] / max(wall - saved, 1e-9)
