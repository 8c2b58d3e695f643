"""AdapterStore: the disk and host tiers of adapter memory.

    register(name, dir) --reads adapter_config.json only--> registered (disk tier)
    get(name) --miss: load_adapter / make()--> host LRU (plain CPU tensors) --> LoRAWeights

Contract:
- ``register`` validates the config (and that it fits the served model) without opening
  the weights, so thousands of adapters register fast; a bad weights file surfaces as an
  AdapterError from ``get``.
- The host tier keeps at most ``host_budget_bytes`` of weights, evicting least recently
  used copies. An adapter bigger than the whole budget is still loaded and returned, but
  not kept. Evicting a host copy only drops the store's reference: a caller still holding
  the LoRAWeights keeps it alive.
- Host tensors are plain (pageable) CPU tensors, never pinned per adapter: pinning a fresh
  buffer costs about as much as the copy it speeds up. The GPU loader copies through its
  own pinned staging buffers; ``pin_memory`` is kept only so callers can pass it through.
- Thread safety: every method may be called from the engine thread and a prefetch thread.
  A lock guards the tables; loading runs outside it, and concurrent ``get`` calls for the
  same adapter share one load.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loraserve.adapters.peft import (
    AdapterConfig,
    LoRAWeights,
    estimate_nbytes,
    expected_ranks,
    load_adapter,
    read_adapter_config,
    warn_base_model,
)
from loraserve.config import ModelConfig

logger = logging.getLogger(__name__)

_MAX_NAME_LEN = 256


@dataclass
class StoreStats:
    host_hits: int = 0
    host_misses: int = 0
    disk_loads: int = 0
    generated_loads: int = 0
    host_evictions: int = 0
    host_bytes: int = 0


@dataclass(frozen=True)
class _Source:
    """Where a registered adapter's weights come from: a directory, or a generator."""

    nbytes: int  # estimated (disk) or declared (generated) host bytes
    config: AdapterConfig | None = None
    make: Callable[[], LoRAWeights] | None = None
    expected: dict[tuple[int, str], int] | None = None  # (disk) expected_ranks of config


class AdapterStore:
    """Registered adapters (disk) and an LRU of their host copies (see module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        dtype: torch.dtype,
        host_budget_bytes: int,
        pin_memory: bool = False,
    ) -> None:
        if host_budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be >= 0, got {host_budget_bytes}")
        self.model = model
        self.dtype = dtype
        self.host_budget_bytes = host_budget_bytes
        self.pin_memory = pin_memory  # not used per adapter: see module docstring
        self._lock = threading.Lock()
        self._sources: dict[str, _Source] = {}
        self._host: OrderedDict[str, LoRAWeights] = OrderedDict()
        self._loading: dict[str, Future[LoRAWeights]] = {}
        self._stats = StoreStats()

    # ---- registry -------------------------------------------------------------------

    def register(self, name: str, path: str | Path) -> AdapterConfig:
        """Register the PEFT adapter directory ``path`` as ``name``; reads only its config.

        The config is checked against the served model (targets, layers) too. Raises
        AdapterError for an invalid config, ValueError for a bad name or a name
        already registered with a different path (registering the same path is a no-op).
        """
        _check_name(name)
        config = read_adapter_config(path)
        expected = expected_ranks(config, self.model)
        warn_base_model(config, self.model)  # (once: loads do not read the config again)
        nbytes = estimate_nbytes(config, self.model, self.dtype, expected)
        source = _Source(nbytes, config=config, expected=expected)
        with self._lock:
            old = self._sources.get(name)
            if old is not None:
                if old.config is not None and _same_dir(old.config.path, config.path):
                    return old.config
                raise ValueError(
                    f"adapter name {name!r} is already registered "
                    f"({_describe(old)}); unregister it first or choose another name"
                )
            self._sources[name] = source
        logger.info("registered adapter %r from %s", name, config.path)
        return config

    def register_generated(self, name: str, make: Callable[[], LoRAWeights], nbytes: int) -> None:
        """Register an adapter with no files: ``make()`` builds it on each host-tier miss.

        ``nbytes`` is its expected size (for budgets before it is made).
        """
        _check_name(name)
        with self._lock:
            if name in self._sources:
                raise ValueError(
                    f"adapter name {name!r} is already registered "
                    f"({_describe(self._sources[name])}); unregister it first"
                )
            self._sources[name] = _Source(nbytes, make=make)

    def unregister(self, name: str) -> None:
        """Forget ``name`` and drop its host copy. KeyError if it is not registered."""
        with self._lock:
            self._source(name)
            del self._sources[name]
            weights = self._host.pop(name, None)
            if weights is not None:
                self._stats.host_bytes -= weights.nbytes
        logger.info("unregistered adapter %r", name)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._sources

    def names(self) -> list[str]:
        with self._lock:
            return list(self._sources)

    def config(self, name: str) -> AdapterConfig | None:
        """The adapter's config; None for a generated adapter. KeyError if unknown."""
        with self._lock:
            return self._source(name).config

    def nbytes(self, name: str) -> int:
        """Expected host bytes of ``name`` (from its config, or as declared if generated)."""
        with self._lock:
            return self._source(name).nbytes

    def in_host(self, name: str) -> bool:
        """Whether a host copy is cached now (``get`` would not touch disk)."""
        with self._lock:
            return name in self._host

    @property
    def stats(self) -> StoreStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return replace(self._stats)

    # ---- host tier ------------------------------------------------------------------

    def get(self, name: str) -> LoRAWeights:
        """The adapter's host weights, loading them on a miss (may block on disk).

        KeyError if ``name`` is not registered; AdapterError if its files are invalid.
        """
        with self._lock:
            source = self._source(name)
            weights = self._host.get(name)
            if weights is not None:
                self._host.move_to_end(name)
                self._stats.host_hits += 1
                return weights
            self._stats.host_misses += 1
            future = self._loading.get(name)
            owner = future is None
            if owner:
                future = self._loading[name] = Future()
        if not owner:
            return future.result()
        return self._load(name, source, future)

    def _load(self, name: str, source: _Source, future: Future[LoRAWeights]) -> LoRAWeights:
        try:
            weights = self._read(name, source)
        except BaseException as e:
            with self._lock:
                del self._loading[name]
            future.set_exception(e)
            raise
        evicted: list[LoRAWeights] = []
        with self._lock:
            del self._loading[name]
            if self._sources.get(name) is source:
                evicted = self._keep(name, weights)
        # Freed here, outside the lock: freeing tens of MB of host memory takes milliseconds
        # (munmap), which the engine thread would otherwise wait out in any store call.
        del evicted
        future.set_result(weights)
        return weights

    def _read(self, name: str, source: _Source) -> LoRAWeights:
        if source.make is not None:
            weights = source.make()
            with self._lock:
                self._stats.generated_loads += 1
            if weights.nbytes != source.nbytes:
                logger.warning(
                    "generated adapter %r has %d bytes, registered as %d",
                    name,
                    weights.nbytes,
                    source.nbytes,
                )
            return weights
        assert source.config is not None
        weights = load_adapter(
            name, source.config.path, self.model, self.dtype, source.config, source.expected
        )
        with self._lock:
            self._stats.disk_loads += 1
        return weights

    def _keep(self, name: str, weights: LoRAWeights) -> list[LoRAWeights]:
        """Insert into the host LRU, evicting others to fit; called with the lock held.
        Returns the evicted weights, for the caller to drop after releasing the lock."""
        size = weights.nbytes
        if size > self.host_budget_bytes:
            logger.info(
                "adapter %r (%d bytes) exceeds the host budget (%d bytes): served, not kept",
                name,
                size,
                self.host_budget_bytes,
            )
            return []
        evicted = []
        while self._stats.host_bytes + size > self.host_budget_bytes:
            victim, dropped = self._host.popitem(last=False)
            evicted.append(dropped)
            self._stats.host_bytes -= dropped.nbytes
            self._stats.host_evictions += 1
            logger.debug("evicted adapter %r from host memory", victim)
        self._host[name] = weights
        self._stats.host_bytes += size
        return evicted

    def _source(self, name: str) -> _Source:
        source = self._sources.get(name)
        if source is None:
            raise KeyError(f"adapter {name!r} is not registered")
        return source

    def check_integrity(self) -> None:
        """Assert the host tier's invariants (for tests)."""
        with self._lock:
            total = sum(w.nbytes for w in self._host.values())
            assert total == self._stats.host_bytes, (total, self._stats.host_bytes)
            assert total <= self.host_budget_bytes, (total, self.host_budget_bytes)
            assert set(self._host) <= set(self._sources), "a host copy of an unknown adapter"


def _check_name(name: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > _MAX_NAME_LEN
        or name in (".", "..")
        or any(c in name for c in "/\\")
        or not name.isprintable()
        or any(c.isspace() for c in name)
    ):
        raise ValueError(
            f"adapter name {name!r} is invalid: use 1-{_MAX_NAME_LEN} printable characters "
            "without spaces, '/' or '\\'"
        )


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _describe(source: _Source) -> str:
    return f"from {source.config.path}" if source.config is not None else "generated"
