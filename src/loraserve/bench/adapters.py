"""Random adapters for benchmarks, registered without files and generated on first use.

``register_adapters`` registers ``adapter-0000 ..`` with ``AdapterStore.register_generated``:
nothing is built until the engine asks the host tier for an adapter, so registering 10,000
takes a fraction of a second and the host LRU and the host -> GPU path run for real.

Two generators, both deterministic in (adapter, layer, target):

- ``bank`` (default): each A and B is a scaled copy of a slice, chosen by a hash of
  (seed, layer, target, A|B), of one random vector made once (8x the largest matrix). A
  rank-64 7B adapter costs 134 MB of copies, ~10-50 ms: about what reading it from the page
  cache would cost a server that loads real adapters.
- ``random``: ``peft.random_lora_weights``, torch.randn per matrix. 1.6 s for a rank-64 7B
  adapter on 2 CPU cores: with thousands of adapters that measures the random number
  generator, not the server.

Both give deltas of A ~ N(0, 1/in_features), B ~ N(0, 0.01/rank), scaling 1 (``bank``
keeps A and B at N(0, 1) and puts the two standard deviations into the scaling).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from loraserve.adapters.peft import (
    FlatEntry,
    FlatLoRA,
    LoRAWeights,
    config_from_dict,
    random_lora_weights,
)
from loraserve.adapters.store import AdapterStore
from loraserve.bench.workload import adapter_name, adapter_rank
from loraserve.config import LORA_TARGETS, ModelConfig
from loraserve.engine.engine import LLMEngine

ADAPTER_SOURCES = ("bank", "random")
_MASK64 = (1 << 64) - 1


def adapter_nbytes(
    model: ModelConfig, rank: int, targets: Sequence[str], dtype: torch.dtype
) -> int:
    """Bytes of A and B of a rank-``rank`` adapter on ``targets`` of every layer."""
    size = torch.empty((), dtype=dtype).element_size()
    per_layer = sum(rank * sum(model.lora_shape(t)) for t in targets)
    return per_layer * model.num_hidden_layers * size


class WeightBank:
    """One random vector that adapters' matrices are cut from (made on first use)."""

    def __init__(self, model: ModelConfig, max_rank: int, dtype: torch.dtype, seed: int = 0):
        largest = max_rank * max(max(model.lora_shape(t)) for t in LORA_TARGETS)
        self.numel = max(1 << 20, 8 * largest)
        self.dtype = dtype
        self.seed = seed
        self._values: torch.Tensor | None = None
        self._lock = threading.Lock()

    def _get(self) -> torch.Tensor:
        with self._lock:
            if self._values is None:
                gen = torch.Generator().manual_seed(self.seed)
                self._values = torch.randn(self.numel, generator=gen).to(self.dtype)
            return self._values

    def slice(self, key: tuple[int, ...], n: int) -> torch.Tensor:
        """A view of ``n`` values of the bank, chosen by ``key``."""
        start = _mix(key) % (self.numel - n + 1)
        return self._get()[start : start + n]


def _mix(key: tuple[int, ...]) -> int:
    """A 64-bit hash of small ints (splitmix64 steps), the same in every process."""
    h = 0x9E3779B97F4A7C15
    for k in key:
        h = (h ^ (k & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
    return h ^ (h >> 29)


def banked_lora_weights(
    bank: WeightBank, name: str, model: ModelConfig, rank: int, targets: Sequence[str], seed: int
) -> LoRAWeights:
    """An adapter of ``rank`` on ``targets`` of every layer, cut from ``bank``.

    A and B are unscaled N(0, 1) slices of the bank; their standard deviations (1/sqrt(in)
    and 0.1/sqrt(rank)) go into the module's scaling, which gives the same delta. One
    ``torch.cat`` copies every matrix into the adapter's own host memory, kept flat (A's
    rows, then B^T's, per projection: FlatLoRA): 1-D slices and one call per adapter, so
    generating on the engine's adapter I/O threads does not wait on the engine thread for
    the GIL once per matrix.
    """
    raw = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets)}
    config = config_from_dict(raw, Path(f"<generated {name}>"))
    views, entries, offset = [], [], 0
    for layer in range(model.num_hidden_layers):
        for target in targets:
            t = LORA_TARGETS.index(target)
            in_f, out_f = model.lora_shape(target)
            scaling = 0.1 / math.sqrt(in_f * rank)
            b_offset = offset + rank * in_f
            entry = FlatEntry(layer, target, rank, in_f, out_f, offset, b_offset, True, scaling)
            entries.append(entry)
            for ab, width in enumerate((in_f, out_f)):
                views.append(bank.slice((seed, layer, t, ab), rank * width))
                offset += rank * width
    return LoRAWeights(name, config, flat=FlatLoRA(torch.cat(views), entries))


class AdapterGenerator:
    """Registers generated adapters of one model, dtype and targets with an engine."""

    def __init__(
        self,
        model: ModelConfig,
        dtype: torch.dtype,
        max_rank: int,
        targets: Sequence[str],
        source: str = "bank",
    ) -> None:
        if source not in ADAPTER_SOURCES:
            raise ValueError(f"adapter source {source!r} not in {ADAPTER_SOURCES}")
        self.model = model
        self.dtype = dtype
        self.targets = tuple(targets)
        self.source = source
        self.bank = WeightBank(model, max_rank, dtype)

    def register(self, engine: LLMEngine, name: str, rank: int, seed: int) -> None:
        """Register ``name``; its weights are made on the engine's first host-tier miss."""
        self.register_with_store(engine.adapter_store, name, rank, seed)

    def register_with_store(self, store: AdapterStore, name: str, rank: int, seed: int) -> None:
        if self.source == "bank":
            args = (self.bank, name, self.model, rank, self.targets, seed)
            make = functools.partial(banked_lora_weights, *args)
        else:
            args = (name, self.model, rank, self.targets, seed, self.dtype)
            make = functools.partial(random_lora_weights, *args)
        nbytes = adapter_nbytes(self.model, rank, self.targets, self.dtype)
        store.register_generated(name, make, nbytes)

    def register_many(
        self, engine: LLMEngine, num_adapters: int, ranks: Sequence[int]
    ) -> list[str]:
        """Register ``adapter-0000 ..`` (adapter i: rank ranks[i % len(ranks)], seed i)."""
        names = [adapter_name(i) for i in range(num_adapters)]
        for i, name in enumerate(names):
            self.register(engine, name, adapter_rank(i, tuple(ranks)), seed=i)
        return names


def register_adapters(
    engine: LLMEngine,
    num_adapters: int,
    ranks: Sequence[int],
    targets: Sequence[str],
    source: str = "bank",
) -> list[str]:
    """Register ``adapter-0000 ..`` as generated adapters; returns their names. Nothing is
    generated now."""
    config = engine.config
    generator = AdapterGenerator(config.model, config.dtype, max(ranks), targets, source)
    return generator.register_many(engine, num_adapters, ranks)
