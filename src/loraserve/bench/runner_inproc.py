"""Open-loop driver of an in-process LLMEngine.

    start ─┬─ add every request whose arrival time has passed ─┐
           │                                                    │ nothing to do: sleep until
           └─ engine.step() ── record first tokens / finishes ──┘ the next arrival
                  └── sample pool use; time decode-only steps

A request's latencies count from its arrival time, not from when the loop got to add it,
as with a real client. A time limit stops the run: requests not finished by then are
aborted and count as unfinished (SLO misses); requests due after it are not issued.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from loraserve.adapters.store import StoreStats
from loraserve.bench.hostprof import StackSampler
from loraserve.bench.metrics import SLO_SECONDS, RequestRecord, summarize
from loraserve.bench.physics import DecodeStats, kv_bytes_per_token, weight_bytes
from loraserve.bench.workload import TraceRequest
from loraserve.engine.engine import DeviceTiming, LLMEngine, PromptError, StepTiming
from loraserve.engine.gc_quiet import quiet_gc
from loraserve.engine.scheduler import AdmissionStats
from loraserve.kernels.compiles import compiled_variants, new_variants
from loraserve.memory.adapter_cache import CacheStats
from loraserve.memory.pool import PageKind
from loraserve.request import Request, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


# How the driver sorts steps (InprocDriver._step_stats)
STEP_KINDS = ("decode", "mixed", "changed", "empty")


class BenchRequest(NamedTuple):
    trace: TraceRequest
    prompt: list[int]  # token ids
    adapter: str | None  # None: the base model


ENGINE_STEP = "loraserve/engine/engine.py:step"  # the host profile's root


@dataclass
class RunOptions:
    label: str = "loraserve"
    time_limit: float | None = None  # seconds after the start
    slo_s: float = SLO_SECONDS
    progress: bool = True
    host_profile: bool = False  # sample the engine thread's stack (bench/hostprof.py)


@dataclass
class RequestState:
    """What the driver knows of one issued request."""

    request: BenchRequest
    first_token: float | None = None
    finish: float | None = None
    output_tokens: int = 0
    error: str | None = None
    queue_s: float | None = None  # arrival -> first step (engine-side), when it started

    def record(self) -> RequestRecord:
        t = self.request.trace
        return RequestRecord(
            t.index,
            t.arrival,
            t.input_len,
            t.output_len,
            self.first_token,
            self.finish,
            self.output_tokens,
            self.error,
        )


@dataclass
class PoolPeak:
    """Most pages in use at once, sampled after every step."""

    kv_pages: int = 0
    adapter_pages: int = 0
    total_pages: int = 0  # KV + adapters at the same sample

    def sample(self, engine: LLMEngine) -> None:
        kv = engine.pool.num_used(PageKind.KV)
        adapters = engine.adapter_cache.pool.num_used(PageKind.ADAPTER)
        self.kv_pages = max(self.kv_pages, kv)
        self.adapter_pages = max(self.adapter_pages, adapters)
        self.total_pages = max(self.total_pages, kv + adapters)

    def as_dict(self, engine: LLMEngine) -> dict[str, Any]:
        page = engine.pool.page_bytes
        separate = engine.adapter_cache.pool is not engine.pool
        return {
            **dataclasses.asdict(self),
            "kv_bytes": self.kv_pages * page,
            "adapter_bytes": self.adapter_pages * page,
            "page_bytes": page,
            "pool_pages": engine.pool.num_pages,
            "adapter_pool_pages": engine.adapter_cache.pool.num_pages if separate else None,
        }


@dataclass
class EngineRun:
    records: list[RequestRecord]
    wall_time: float
    not_issued: int
    pool: dict[str, Any]
    adapters: dict[str, Any]
    decode: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def result(self, slo_s: float = SLO_SECONDS) -> dict[str, Any]:
        return {
            **summarize(self.records, self.wall_time, slo_s).as_dict(),
            "not_issued": self.not_issued,
            "adapter_loads": self.adapters,
            "pool_peak": self.pool,
            "decode": self.decode,
            **self.extra,
        }


class GCPauses:
    """Python's cyclic garbage collections while a run steps (``gc.callbacks``): how many
    of each generation, and the seconds they held the engine thread (and the GIL)."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self.longest = 0.0
        self._t0 = 0.0

    def __enter__(self) -> GCPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        pause = time.perf_counter() - self._t0
        self.counts[info["generation"]] += 1
        self.seconds += pause
        self.longest = max(self.longest, pause)

    def as_dict(self) -> dict[str, Any]:
        longest_ms = 1e3 * self.longest
        return {"collections": self.counts, "seconds": self.seconds, "longest_ms": longest_ms}


def params_for(request: BenchRequest) -> SamplingParams:
    """Greedy, exactly ``output_len`` tokens (EOS ignored), as S-LoRA's client asks."""
    return SamplingParams(max_tokens=request.trace.output_len, temperature=0.0, ignore_eos=True)


def warm_up(engine: LLMEngine, adapter: str | None) -> None:
    """Two short requests (a prefill of several tokens, then decodes) before timing."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, n in enumerate((24, 7)):
        engine.add_request([i + 1] * n, params, request_id=f"warmup-{i}", adapter=adapter)
    while engine.has_unfinished():
        if not engine.step() and not engine.scheduler.running:
            time.sleep(2e-4)  # waiting for the adapter: let the loader thread run


@dataclass
class StepKind:
    """Steps of one kind: their count, wall time, and the engine's phases summed
    (``StepTiming``: a phase ``wait`` near zero means the host, not the device, set the pace)."""

    steps: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(
        default_factory=lambda: {f.name: 0.0 for f in dataclasses.fields(StepTiming)}
    )

    host_bound: int = 0  # steps that waited < 1 ms for the device after enqueuing
    # The device time of the steps these collected (engine.time_device: CUDA), ms summed
    timed: int = 0
    device_busy_ms: float = 0.0
    device_idle_ms: float = 0.0
    idle_over_1ms: int = 0  # of the timed steps: the device sat idle > 1 ms before it

    def add(self, seconds: float, timing: StepTiming, device: DeviceTiming | None) -> None:
        self.steps += 1
        self.seconds += seconds
        self.host_bound += timing.wait < 1e-3
        for name in self.phases:
            self.phases[name] += getattr(timing, name)
        if device is not None:
            self.timed += 1
            self.device_busy_ms += device.busy
            self.device_idle_ms += device.idle
            self.idle_over_1ms += device.idle > 1.0

    def as_dict(self) -> dict[str, Any]:
        n = self.steps
        return {
            "steps": n,
            "seconds": self.seconds,
            "avg_ms": 1e3 * self.seconds / n if n else None,
            "phases_avg_ms": {k: 1e3 * v / n for k, v in self.phases.items()} if n else None,
            "host_bound_share": self.host_bound / n if n else None,
            # per step timed: the device's time on the step collected, and its idle time
            # before that step (nothing queued)
            "device_busy_avg_ms": self.device_busy_ms / self.timed if self.timed else None,
            "device_idle_avg_ms": self.device_idle_ms / self.timed if self.timed else None,
            "device_idle_over_1ms": self.idle_over_1ms,
        }


def all_decoding(requests: list[Request]) -> bool:
    """Every request's next step is one token (a decode row, no prompt left to prefill)."""
    return all(r.num_tokens - r.num_computed_tokens == 1 for r in requests)


class InprocDriver:
    def __init__(
        self, engine: LLMEngine, requests: list[BenchRequest], options: RunOptions
    ) -> None:
        self.engine = engine
        self.requests = sorted(requests, key=lambda r: r.trace.arrival)
        self.options = options
        self.live: dict[str, RequestState] = {}
        self.pool = PoolPeak()
        self.decode = DecodeStats(weight_bytes(engine.model))
        self.steps = {kind: StepKind() for kind in STEP_KINDS}
        engine.time_device = True  # (CUDA only: a timing event before and after each step)
        self._kv_token = kv_bytes_per_token(engine.config.model, engine.config.dtype)
        self._start = 0.0
        self._io0 = 0.0
        self._staging0: dict[str, float] = {}
        self.sampler: StackSampler | None = None
        self._adapter_bytes: dict[str, int] = {}

    def _now(self) -> float:
        return time.perf_counter() - self._start

    def run(self) -> EngineRun:
        gpu0 = dataclasses.replace(self.engine.adapter_cache.stats)
        self._io0 = self.engine.adapters.io_seconds
        self._loads0 = len(self.engine.adapters.load_times.records)
        self._no_room0 = self.engine.adapters.no_room
        self._thread_loads0 = self.engine.adapters.thread_loads
        self._staging0 = self.engine.adapter_cache.staging
        host0 = self.engine.adapter_store.stats
        pending = deque(self.requests)
        limit = self.options.time_limit
        compiled0 = compiled_variants()
        alloc0 = allocator_counts(self.engine.device)
        passes0 = forward_passes(self.engine)
        admission0 = dataclasses.replace(self.engine.scheduler.stats)
        launches0 = dataclasses.asdict(self.engine.launch_stats)
        if self.options.host_profile:
            self.sampler = StackSampler(root=ENGINE_STEP).start()
        # What exists now (the engine, its adapters, the trace) lives through the run: out
        # of the collector's sight, and collections rarer, as the server runs (gc_quiet)
        restore_gc = quiet_gc()
        with (
            GCPauses() as pauses,
            tqdm(
                total=len(self.requests),
                desc=self.options.label,
                unit="req",
                disable=not self.options.progress,
            ) as bar,
        ):
            self._start = time.perf_counter()
            while pending or self.engine.has_unfinished():
                now = self._now()
                self._issue(pending, now if limit is None else min(now, limit), bar)
                if limit is not None and now >= limit:
                    break
                if self.engine.has_unfinished():
                    self._step(bar)
                elif pending:
                    self._sleep_until(pending[0].trace.arrival)
        wall = self._now()
        restore_gc()
        profile = self.sampler.stop() if self.sampler is not None else None
        self._abort_unfinished()
        logger.info("%s: %d requests issued in %.1f s", self.options.label, len(self.live), wall)
        return EngineRun(
            records=[live.record() for live in self.live.values()],
            wall_time=wall,
            not_issued=len(pending),
            pool=self.pool.as_dict(self.engine),
            adapters=self._adapter_stats(gpu0, host0),
            decode=self.decode.as_dict(),
            extra={
                "queue": self._queue_stats(),
                "steps": self._step_stats(wall),
                "triton_compiles": new_variants(compiled0, compiled_variants()),
                "cuda_allocator": _delta(alloc0, allocator_counts(self.engine.device)),
                "forward_passes": _delta(passes0, forward_passes(self.engine)),
                "admission": _admission(admission0, self.engine.scheduler.stats),
                # steps queued behind the previous one vs launched after it, and why not
                "launches": _delta(launches0, dataclasses.asdict(self.engine.launch_stats)),
                "gc": pauses.as_dict(),
                **({"host_profile": profile} if profile is not None else {}),
            },
        )

    def _step_stats(self, wall: float) -> dict[str, Any]:
        """Where the wall time went: pure decode steps (graphed when they fit), steps that
        prefilled prompts ("mixed": a request got its first token), steps whose batch changed
        without a prompt finishing ("changed": a decode step that queued a prompt step
        behind it, a preemption, a partial prefill chunk), steps that produced nothing
        ("empty": waiting for adapters or the prefill window), and the rest (idle, the
        driver). Runs recorded before GPU session 13 counted "changed" steps as "mixed"."""
        stats: dict[str, Any] = {kind: k.as_dict() for kind, k in self.steps.items()}
        stats["outside_steps_s"] = wall - sum(k.seconds for k in self.steps.values())
        return stats

    def _queue_stats(self) -> dict[str, Any]:
        """Engine-side time from arrival to the first step of the requests that started
        (waiting for room in the batch and for their adapter)."""
        waits = [s.queue_s for s in self.live.values() if s.queue_s is not None]
        if not waits:
            return {"started": 0, "avg_s": None, "p99_s": None, "max_s": None}
        return {
            "started": len(waits),
            "avg_s": float(np.mean(waits)),
            "p99_s": float(np.percentile(waits, 99)),  # as metrics.summarize does
            "max_s": max(waits),
        }

    def _sleep_until(self, due: float) -> None:
        limit = self.options.time_limit
        wake = due if limit is None else min(due, limit)
        time.sleep(max(0.0, wake - self._now()))

    def _issue(self, pending: deque[BenchRequest], now: float, bar: tqdm) -> None:
        while pending and pending[0].trace.arrival <= now:
            request = pending.popleft()
            request_id = str(request.trace.index)
            live = self.live[request_id] = RequestState(request)
            try:
                self.engine.add_request(
                    request.prompt, params_for(request), request_id, request.adapter
                )
            except (PromptError, ValueError, KeyError) as e:
                live.error = str(e)
                bar.update(1)

    def _step(self, bar: tqdm) -> None:
        running = list(self.engine.scheduler.running)
        decode = self._decode_bytes(running)
        t0 = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - t0
        now = self._now()
        self.pool.sample(self.engine)
        if decode is not None and _same_requests(running, outputs, self.engine):
            self.decode.add(seconds, len(running), *decode)
            kind = "decode"
        elif any(len(o.token_ids) == 1 for o in outputs):
            kind = "mixed"  # a request's first token: its prompt was computed in this step
        else:
            kind = "changed" if outputs else "empty"
        self.steps[kind].add(seconds, self.engine.last_step, self.engine.last_device)
        if self.sampler is not None:
            self.sampler.flush(kind)
        for out in outputs:
            self._update(out, now, bar)
        if not outputs and not self.engine.scheduler.running:
            time.sleep(2e-4)  # only waiting for adapters: let the loader thread run

    def _decode_bytes(self, running: list[Request]) -> tuple[int, int, int] | None:
        """(KV bytes, distinct adapter bytes, distinct adapters) a decode step of ``running``
        reads; None if some running request has more than one token to compute (a prefill)."""
        if not running or not all_decoding(running):
            return None
        adapters = {r.adapter for r in running if r.adapter is not None}
        adapter_bytes = sum(self._nbytes(a) for a in adapters)
        return sum(r.num_tokens for r in running) * self._kv_token, adapter_bytes, len(adapters)

    def _nbytes(self, adapter: str) -> int:
        """An adapter's bytes, looked up in the store once (its lock is shared with the I/O
        threads: not once per adapter per step)."""
        nbytes = self._adapter_bytes.get(adapter)
        if nbytes is None:
            try:
                nbytes = self.engine.adapter_store.nbytes(adapter)
            except KeyError:  # unregistered since: its bytes are no longer known
                return 0
            self._adapter_bytes[adapter] = nbytes
        return nbytes

    def _update(self, out: RequestOutput, now: float, bar: tqdm) -> None:
        live = self.live.get(out.request_id)
        if live is None:
            return
        if out.token_ids and live.first_token is None:
            live.first_token = now
        if live.queue_s is None:
            live.queue_s = out.time_in_queue
        live.output_tokens = len(out.token_ids)
        if out.finished:
            live.error = out.error if out.finish_reason == "error" else None
            live.finish = now
            bar.update(1)

    def _abort_unfinished(self) -> None:
        for request_id, live in self.live.items():
            if live.finish is None and live.error is None:
                self.engine.abort(request_id)
        while self.engine.has_unfinished():
            self.engine.step()

    def _adapter_stats(self, gpu0: CacheStats, host0: StoreStats) -> dict[str, Any]:
        """Adapter loads during the run (GPU tier: into pool pages; host tier: generated
        or read from disk) and how many distinct adapters the run issued and served."""
        gpu, host = self.engine.adapter_cache.stats, self.engine.adapter_store.stats
        staging = self.engine.adapter_cache.staging
        states = self.live.values()
        issued = {s.request.adapter for s in states} - {None}
        served = {s.request.adapter for s in states if s.record().completed} - {None}
        return {
            "gpu_loads": gpu.gpu_loads - gpu0.gpu_loads,
            "gpu_evictions": gpu.gpu_evictions - gpu0.gpu_evictions,
            "gpu_bytes_loaded": gpu.bytes_loaded - gpu0.bytes_loaded,
            "host_loads": _host_loads(host) - _host_loads(host0),
            "host_evictions": host.host_evictions - host0.host_evictions,
            # Reading/generating and packing, summed over the adapter I/O threads.
            "io_thread_s": self.engine.adapters.io_seconds - self._io0,
            # Asked for -> ready on the device, by phase (AdapterManager.load_times), in ms.
            "load_times": self.engine.adapters.load_times.as_dict(self._loads0),
            # Tries to load a packed adapter that found no room in the pool or the slots.
            "load_no_room": self.engine.adapters.no_room - self._no_room0,
            # Loads given pages and copies by the I/O thread that packed them, while the
            # engine thread waited for the device (AdapterManager.device_wait).
            "loads_in_wait": self.engine.adapters.thread_loads - self._thread_loads0,
            # Host staging buffers made during the run (pinned on CUDA: slow to make).
            "staging_allocations": staging["allocations"] - self._staging0["allocations"],
            "staging_alloc_s": staging["seconds"] - self._staging0["seconds"],
            "distinct_adapters_issued": len(issued),
            "distinct_adapters_served": len(served),
        }


# torch's CUDA caching allocator events: a retry (no cached block fits: it frees its cached
# blocks, which synchronises the device, and tries again) or a cudaMalloc/cudaFree in the
# middle of a step stalls it.
_ALLOCATOR_COUNTS = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free")


def allocator_counts(device) -> dict[str, int] | None:
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {k: int(stats.get(k, 0)) for k in _ALLOCATOR_COUNTS}


def forward_passes(engine: LLMEngine) -> dict[str, int]:
    """Forward passes so far by kind: decode graph replays (of which with LoRA rows grouped
    by adapter, and of which the small-rank graphs' fused LoRA), prefill graph replays (a
    step may make several; of which with LoRA tiles for small ranks), eager passes; and
    the steps that computed prompt tokens."""
    runner = engine.runner
    graphs, prefill = runner.graphs, runner.prefill_graphs
    return {
        "decode_graph": graphs.steps if graphs is not None else 0,
        "decode_graph_grouped": graphs.grouped_steps if graphs is not None else 0,
        "decode_graph_small_rank": graphs.small_steps if graphs is not None else 0,
        "prefill_graph": prefill.steps if prefill is not None else 0,
        "prefill_graph_small_rank": prefill.small_steps if prefill is not None else 0,
        "eager": runner.eager_passes,
        "prompt_steps": runner.prompt_steps,
    }


def _delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in after}


def _host_loads(stats: StoreStats) -> int:
    return stats.generated_loads + stats.disk_loads


def _admission(before: AdmissionStats, after: AdmissionStats) -> dict[str, Any]:
    """The scheduler's admissions during the run (``AdmissionStats``), and the requests each
    started on average."""
    out: dict[str, Any] = dict(_delta(dataclasses.asdict(before), dataclasses.asdict(after)))
    out["started_per_admission"] = out["started"] / out["admissions"] if out["admissions"] else None
    return out


def _same_requests(running: list[Request], outputs: list[RequestOutput], engine: LLMEngine) -> bool:
    """The step computed exactly the requests that were running before it: each produced a
    token, none was preempted, none was admitted."""
    before = {r.request_id for r in running}
    return (
        len(outputs) == len(running)
        and all(o.request_id in before for o in outputs)
        and all(r.request_id in before for r in engine.scheduler.running)
    )
