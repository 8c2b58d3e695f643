"""AdapterManager: moves adapters through the three tiers for the scheduler.

    disk (registered: config only) --I/O threads--> host LRU (AdapterStore)
        --I/O threads: packed into a pinned buffer laid out like its pages (AdapterCache.pack)
        --engine thread: pages, tables, side-stream copy--> pool pages (AdapterCache) --> ready

The engine thread does only the page allocation and the copy launches (a few per page); the
reading, generating and packing of weights run on ``IO_THREADS`` background threads. While
the engine thread waits for the device (``device_wait``), an I/O thread that finishes packing
takes the engine thread's part too: the load gets its pages and its copy then, not at the
engine thread's next look (after the step: on average half a step later).

``ensure(name)`` is non-blocking: it starts whatever step is missing and says whether the
adapter is ready on the device now. The scheduler admits a request only when its adapter is
ready, so requests wait in the queue, not in the batch. ``prefetch`` does the same for the
adapters of queued requests while the device computes a step.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from loraserve.adapters.store import AdapterStore
from loraserve.memory.adapter_cache import AdapterCache, PackedAdapter
from loraserve.memory.pool import PageKind

logger = logging.getLogger(__name__)

# Adapters read/generated and packed at once: file I/O and memcpy, which release the GIL.
IO_THREADS = max(2, min(8, (os.cpu_count() or 2) // 2))


def _one_cpu_thread() -> None:
    """I/O thread initializer: this thread's torch CPU ops run on one core.

    A large copy on a thread of its own would otherwise start an OpenMP team of one thread
    per core (libgomp gives each calling thread its own team): with 8 I/O threads, 8 x cores
    spinning threads that crowd out the engine thread's kernel launches. Only this thread's
    OpenMP setting changes (``torch.set_num_threads`` would change the default of every
    thread started later). Without an OpenMP runtime in the process this does nothing.
    """
    try:
        set_threads = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return
    torch.get_num_threads()  # torch's own per-thread setup first: it would undo ours
    set_threads(1)


PHASES = ("queued", "reading", "packed", "copying")


@dataclass
class LoadTimes:
    """Where the loads that reached "ready" spent their time, as the engine thread saw it,
    one (queued, reading, packed, copying) record of seconds per load:

    - queued: asked for (prefetch or admission) -> an I/O thread took it;
    - reading: on the I/O thread, read or generated, and packed;
    - packed: packed -> given pool pages by the engine thread's next ``ensure``;
    - copying: pages given -> its copy seen finished by an ``ensure``.

    A load that found no room in the pool and was asked for again counts from its first
    ask (in ``queued``)."""

    records: list[tuple[float, float, float, float]] = field(default_factory=list)

    def as_dict(self, since: int = 0) -> dict[str, float]:
        """Milliseconds over the loads after the first ``since``: the average of each phase,
        and the average, median, p99 and max of asked -> ready."""
        records = self.records[since:]
        if not records:
            return {"loads": 0}
        n = len(records)
        totals = sorted(sum(r) for r in records)
        out: dict[str, float] = {"loads": n, "avg_ms": 1e3 * sum(totals) / n}
        for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("max_ms", 1.0)):
            out[name] = 1e3 * totals[min(n - 1, int(q * n))]
        for i, phase in enumerate(PHASES):
            out[f"{phase}_avg_ms"] = 1e3 * sum(r[i] for r in records) / n
        return out


class AdapterLoadError(RuntimeError):
    """An adapter that was registered but cannot be loaded (bad file, shapes, rank)."""


class AdapterManager:
    def __init__(
        self,
        store: AdapterStore,
        cache: AdapterCache,
        background: bool = True,
        threads: int | None = None,  # None: IO_THREADS
        copy_in_wait: bool = True,
    ) -> None:
        self.store = store
        self.cache = cache
        self.threads = (threads or IO_THREADS) if background else 0
        self._executor = (
            ThreadPoolExecutor(self.threads, "adapter-io", initializer=_one_cpu_thread)
            if background
            else None
        )
        self._fetching: dict[str, Future[PackedAdapter | None]] = {}
        # packed adapters whose load found no room (no slot or pages free of the protected)
        self._held: dict[str, PackedAdapter] = {}
        self._failed: dict[str, str] = {}
        self._io_lock = threading.Lock()
        self._io_seconds = 0.0
        # name -> perf_counter() times of a load under way: asked, thread start, packed,
        # given pages (under _io_lock: the I/O threads write the middle two)
        self._timeline: dict[str, list[float]] = {}
        self.load_times = LoadTimes()
        # tries to load a packed adapter that found no room (no slot or pages free of the
        # protected and the pinned): what a long "packed" phase waits for, if not the engine
        # thread's next look
        self.no_room = 0
        # Who may touch the cache, the pool and this manager's state: the engine thread holds
        # this lock except inside ``device_wait``, where an I/O thread that has packed an
        # adapter takes it to load the adapter itself (``_pack_and_load``).
        self.copy_in_wait = copy_in_wait and self._executor is not None
        self._engine_away = threading.Lock()
        self._engine_away.acquire()
        self._wait_names: list[str] = []  # device_wait's order of need (protects earlier ones)
        self._load_error: BaseException | None = None  # raised by an I/O thread's load
        self.thread_loads = 0  # loads given pages and copies on an I/O thread

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def ensure(self, name: str, protect: Collection[str] = ()) -> bool:
        """True if ``name`` is resident and its copy has completed. Raises AdapterLoadError
        if the adapter cannot be loaded at all. Loading it evicts no adapter named in
        ``protect``; one that finds no room stays packed for a later call."""
        if name in self._failed:
            raise AdapterLoadError(self._failed[name])
        if name in self.cache:
            return self._ready(name)
        packed = self._packed(name)
        if packed is None:
            return False
        need = packed.num_pages
        loaded = self.cache.load(packed, protect, keep=True)
        if not loaded:
            self.no_room += 1
            if self._pool_idle() and not protect:
                self.cache.discard(packed)
                have = self.cache.pool.num_pages
                self._fail(
                    name,
                    f"it needs {need} pages and the page pool has {have}: give the pool "
                    "more memory",
                )
            self._held[name] = packed  # read and packed already: only room is missing
            return False
        self._mark(name, 3)
        return self._ready(name)

    def _mark(self, name: str, phase: int) -> None:
        """Time phase ``phase`` (0 asked, 1 thread start, 2 packed, 3 given pages) of
        ``name``'s load; asked keeps its first time across retries."""
        now = time.perf_counter()
        with self._io_lock:
            times = self._timeline.get(name)
            if phase == 0:
                # fresh unless a retry after a load that found no room (never given pages);
                # one given pages and dropped before anyone saw it ready starts over
                if times is None or times[3] != times[0]:
                    self._timeline[name] = [now, now, now, now]
            elif times is not None:
                times[phase] = now

    def is_ready(self, name: str) -> bool:
        """Resident and copied (no load starts here); as ``ensure`` does, the first call that
        finds a load ready records its ``load_times``."""
        return name in self.cache and self._ready(name)

    def _ready(self, name: str) -> bool:
        if not self.cache.is_ready(name):
            return False
        with self._io_lock:
            times = self._timeline.pop(name, None)
        if times is not None:
            asked, started, packed, paged = times
            record = (
                started - asked,
                packed - started,
                paged - packed,
                time.perf_counter() - paged,
            )
            self.load_times.records.append(record)
        return True

    def stage(self, name: str) -> str:
        """Where an adapter is on its way to the pool: "ready"; "copying" (resident, its copy
        to the pool pages not finished); "packed" (read and packed on an I/O thread, not
        loaded yet: the next ``ensure`` loads it); "reading" (an I/O thread is reading or
        generating and packing it); "idle" (nothing started: not yet asked for, or dropped
        after a load found no room)."""
        if name in self.cache:
            return "ready" if self.cache.is_ready(name) else "copying"
        if name in self._held:
            return "packed"
        future = self._fetching.get(name)
        if future is None:
            return "idle"
        return "packed" if future.done() else "reading"

    def _pool_idle(self) -> bool:
        """Nothing holds pages that will come back: a load that fails now always will."""
        return self.cache.num_pinned == 0 and self.cache.pool.num_used(PageKind.KV) == 0

    def prefetch(self, names: list[str]) -> None:
        """Move the loads of ``names`` (in the order they will be needed) on. An adapter's
        load evicts none of those before it in the list: with few slots, a later one
        waits packed instead of pushing out one that is needed sooner."""
        for i, name in enumerate(names):
            try:
                self.ensure(name, names[:i])
            except AdapterLoadError:
                continue  # reported to the request when it is scheduled

    @contextlib.contextmanager
    def device_wait(self, names: list[str]) -> Iterator[None]:
        """For the engine thread, around a wait for the device that touches no adapter
        state: an I/O thread that finishes packing an adapter meanwhile loads it (pages,
        tables, copy launch) as ``ensure(name, protect)`` would, ``protect`` being the
        adapters before it in ``names`` (all of them if it is not in ``names``). Leaving
        waits for a load under way on an I/O thread (page allocation and copy launches),
        and raises what such a load raised other than AdapterLoadError (a bug, or a CUDA
        error), as the engine thread's own load would have."""
        if not self.copy_in_wait:
            yield
            return
        self._wait_names = names
        self._engine_away.release()
        try:
            yield
        finally:
            self._engine_away.acquire()
        error, self._load_error = self._load_error, None
        if error is not None:
            raise RuntimeError(f"an adapter load on an I/O thread failed: {error!r}") from error

    def _pack_and_load(
        self, name: str, ticket: list[Future[PackedAdapter | None]]
    ) -> PackedAdapter | None:
        """On an I/O thread: pack ``name``; if the engine thread is in ``device_wait``, load
        it too and return None (the engine thread's next ``ensure`` finds it resident, or
        packed in ``_held`` if it found no room); otherwise return the packed adapter for
        the engine thread's next ``ensure``. ``ticket`` holds this load's future."""
        packed = self._pack(name)
        if not self.copy_in_wait or not self._engine_away.acquire(blocking=False):
            return packed
        try:
            if self._fetching.get(name) is not ticket[0]:
                return packed  # forgotten meanwhile: the engine thread's callback discards it
            del self._fetching[name]
            self._held[name] = packed
            names = self._wait_names
            protect = names[: names.index(name)] if name in names else names
            try:
                self.ensure(name, protect)
            except AdapterLoadError:
                pass  # kept in _failed: the engine thread's next ensure reports it
            except BaseException as e:
                self._load_error = e  # for the engine thread, when its wait ends
                raise
            if name in self.cache:
                self.thread_loads += 1
            return None
        finally:
            self._engine_away.release()

    def _packed(self, name: str) -> PackedAdapter | None:
        """The packed host copy if available now; otherwise start making it, return None."""
        held = self._held.pop(name, None)
        if held is not None:
            return held
        future = self._fetching.get(name)
        if future is None:
            self._mark(name, 0)
            if self._executor is None:
                return self._read(name)
            ticket: list[Future[PackedAdapter | None]] = []
            future = self._executor.submit(self._pack_and_load, name, ticket)
            ticket.append(future)  # (before an I/O thread can look: this thread holds the lock)
            self._fetching[name] = future
            return None
        if not future.done():
            return None
        del self._fetching[name]
        try:
            return future.result()
        except (ValueError, OSError, KeyError) as e:
            self._fail(name, str(e))

    def _pack(self, name: str) -> PackedAdapter:
        self._mark(name, 1)
        start = time.perf_counter()
        try:
            return self.cache.pack(self.store.get(name))
        finally:
            self._mark(name, 2)
            with self._io_lock:
                self._io_seconds += time.perf_counter() - start

    @property
    def io_seconds(self) -> float:
        """Wall seconds spent reading, generating and packing adapters, summed over the
        threads that did it (the I/O threads, or the engine thread without them): CPU the
        engine thread may have competed with."""
        with self._io_lock:
            return self._io_seconds

    def _read(self, name: str) -> PackedAdapter:
        try:
            return self._pack(name)
        except (ValueError, OSError, KeyError) as e:
            self._fail(name, str(e))

    def _fail(self, name: str, message: str) -> None:
        with self._io_lock:
            self._timeline.pop(name, None)
        logger.error("adapter %r cannot be loaded: %s", name, message)
        self._failed[name] = f"adapter {name!r} cannot be loaded: {message}"
        raise AdapterLoadError(self._failed[name])

    def forget(self, name: str) -> None:
        """Drop every trace of an adapter (after unregistering it)."""
        self._failed.pop(name, None)
        with self._io_lock:
            self._timeline.pop(name, None)
        future = self._fetching.pop(name, None)
        if future is not None:
            future.add_done_callback(self._discard)
        held = self._held.pop(name, None)
        if held is not None:
            self.cache.discard(held)
        if name in self.cache:
            self.cache.evict(name)

    def _discard(self, future: Future[PackedAdapter | None]) -> None:
        if future.exception() is None and future.result() is not None:
            self.cache.discard(future.result())

    def clear_failure(self, name: str) -> None:
        self._failed.pop(name, None)

    def shutdown(self) -> None:
        if self._executor is not None:
            self.copy_in_wait = False  # (no I/O thread loads anything from now)
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._fetching.clear()
        self._held.clear()
