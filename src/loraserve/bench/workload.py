"""S-LoRA's synthetic workload (its ``benchmarks/trace.py``), draw for draw.

One request stream for the whole run:

    arrivals   t_i = t_(i-1) + Gamma(shape 1/cv^2, scale cv^2/R)     (cv = 1: Poisson)
    adapter    floor(n * X),  X ~ power(alpha) on [0, 1)             (alpha = 1: uniform)
    lengths    input, output ~ uniform integers in [lo, hi)          (default [8, 512))
    rank       adapter i has ranks[i % len(ranks)]

The draws come from ``numpy.random.RandomState(seed)``, the legacy generator that S-LoRA
seeds with ``np.random.seed(seed)``, in S-LoRA's order (power, randint, randint, gamma), so
the same seed gives S-LoRA's trace exactly. Prompt token ids, which S-LoRA does not draw
(it sends "Hello " * len), come from ``numpy.random.default_rng([seed, i])`` per request:
independent of the trace and reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from loraserve.config import LORA_TARGETS


class Setting(NamedTuple):
    """One of S-LoRA's model settings: a model preset and the adapters' ranks."""

    model: str
    ranks: tuple[int, ...]


SETTINGS: dict[str, Setting] = {
    "S1": Setting("llama-7b", (8,)),
    "S2": Setting("llama-7b", (64, 32, 16, 8)),
    "S4": Setting("llama-13b", (64, 32, 16)),
    "S5": Setting("llama-30b", (32,)),
    "S6": Setting("llama-70b", (64,)),
}

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class WorkloadConfig:
    num_adapters: int
    alpha: float = 1.0
    rate: float = 10.0  # requests per second
    cv: float = 1.0  # coefficient of variation of the inter-arrival gaps
    duration: float = 300.0  # seconds
    input_range: tuple[int, int] = (8, 512)  # [lo, hi)
    output_range: tuple[int, int] = (8, 512)  # [lo, hi)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.num_adapters < 1:
            raise ValueError(f"the number of adapters (-n) must be >= 1, got {self.num_adapters}")
        for name in ("alpha", "rate", "cv", "duration"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("input_range", "output_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo < hi:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be LO,HI with 1 <= LO < HI, got {lo},{hi}")

    @property
    def num_requests(self) -> int:
        return int(self.rate * self.duration)


class TraceRequest(NamedTuple):
    index: int
    arrival: float  # seconds after the start of the run
    adapter: int  # 0 .. num_adapters - 1
    input_len: int
    output_len: int


def generate_trace(config: WorkloadConfig) -> list[TraceRequest]:
    """S-LoRA's ``generate_requests`` (see the module docstring)."""
    rs = np.random.RandomState(config.seed)
    total = config.num_requests
    adapters = (rs.power(config.alpha, total) * config.num_adapters).astype(int)
    input_lens = rs.randint(config.input_range[0], config.input_range[1], total)
    output_lens = rs.randint(config.output_range[0], config.output_range[1], total)
    cv2 = config.cv * config.cv
    arrivals = np.cumsum(rs.gamma(1.0 / cv2, cv2 / config.rate, total))
    return [
        TraceRequest(
            i, float(arrivals[i]), int(adapters[i]), int(input_lens[i]), int(output_lens[i])
        )
        for i in range(total)
    ]


def adapter_name(index: int) -> str:
    """The name of adapter ``index``, as ``loraserve make-adapters`` writes them."""
    return f"adapter-{index:04d}"


def adapter_rank(index: int, ranks: tuple[int, ...]) -> int:
    return ranks[index % len(ranks)]


def prompt_token_ids(request: TraceRequest, vocab_size: int, seed: int) -> list[int]:
    """``input_len`` random token ids in [0, vocab_size), the same for the same seed."""
    rng = np.random.default_rng([seed, request.index])
    return rng.integers(0, vocab_size, request.input_len).tolist()


def parse_targets(spec: str) -> tuple[str, ...]:
    """'qkvo' | 'all' | a comma-separated list of projections."""
    if spec == "qkvo":
        return QKVO
    if spec == "all":
        return LORA_TARGETS
    targets = tuple(t.strip() for t in spec.split(",") if t.strip())
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"--targets: {unknown or spec!r} not in qkvo, all, {LORA_TARGETS}")
    return tuple(t for t in LORA_TARGETS if t in targets)
