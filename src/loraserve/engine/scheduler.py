"""Iteration-level (continuous) batching.

Every step the scheduler hands out a budget of ``max_num_batched_tokens`` tokens:

1. Running requests first, oldest first: each gets the tokens it still has to compute
   (1 in decode; the rest of its prompt, possibly in chunks, in prefill). If the pool has
   no page for one, the NEWEST running request is preempted (pages freed, progress reset,
   back to the front of the queue to be recomputed) until the page is found.
2. Then waiting requests, in arrival order, while the budget, ``max_num_seqs`` and the
   pool allow: admission takes the pages for the tokens scheduled now and leaves a small
   watermark of free pages so that running requests can grow. A request whose adapter is
   not yet resident in the pool stays in the queue (its load is started) and the requests
   behind it may go first, up to ``lookahead`` such requests deep; admission pins the
   adapter, finishing or preemption unpins it.

A request never waits behind the budget forever: a prompt larger than the budget is
prefilled in chunks over several steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraserve.config import SchedulerConfig
from loraserve.engine.adapters import AdapterLoadError, AdapterManager
from loraserve.memory.kv_cache import KVCacheManager
from loraserve.request import ERROR_ADAPTER, ERROR_DEADLINE, Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_scheduled: list[int] = field(default_factory=list)  # new tokens per request
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # adapter could not be loaded

    def add(self, request: Request, n: int) -> None:
        self.requests.append(request)
        self.num_scheduled.append(n)

    @property
    def empty(self) -> bool:
        return not self.requests

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled)


@dataclass
class AdmissionStats:
    """How waiting requests got into the batch, counted since the scheduler was made: a
    run's admissions that each start few requests (many mixed steps for the same prompts)
    with many ``adapter_waits`` point at adapter loads that did not keep up with the queue."""

    admissions: int = 0  # scheduling passes that started at least one waiting request
    started: int = 0  # requests started (a preempted one once more when it restarts)
    # passes that left a request waiting for its adapter's load while a sequence slot was
    # free (it, or the requests behind it, could have started with the adapter ready)
    adapter_waits: int = 0
    # ... by where the first such adapter was (AdapterManager.stage): nothing started (the
    # prefetch had not reached it), on an I/O thread, packed but not loaded, copying, or
    # ready by the end of the pass (its load finished while the pass ran)
    wait_idle: int = 0
    wait_reading: int = 0
    wait_packed: int = 0
    wait_copying: int = 0
    wait_ready: int = 0

    def adapter_wait(self, stage: str) -> None:
        self.adapter_waits += 1
        name = f"wait_{stage}"
        setattr(self, name, getattr(self, name) + 1)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        adapters: AdapterManager | None = None,
        watermark: float = 0.01,
        lookahead: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookahead = lookahead
        self.clock = clock
        self.config = config
        self.kv = kv
        self.adapters = adapters
        self.watermark_pages = int(watermark * kv.pool.num_pages)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._last_admission = -math.inf  # clock() of the last admission (admission_interval)
        self.stats = AdmissionStats()

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if self.config.ttft_deadline is not None:
            self._expire_waiting(batch, self.config.ttft_deadline)
        if not batch.preempted and self._admit_now(batch):
            started = self.stats.started
            waited = self._schedule_waiting(batch, budget)
            if waited is not None:
                self.stats.adapter_wait(self.adapters.stage(waited))
            self.stats.admissions += self.stats.started > started
        return batch

    def _expire_waiting(self, batch: ScheduledBatch, deadline: float) -> None:
        """Fail queued requests that have waited ``deadline`` seconds without a first token.
        The queue is in arrival order (preempted requests, which have their first token,
        go to the front): stop at the first one still inside its deadline."""
        now = self.clock()
        for request in list(self.waiting):
            if request.output_token_ids:
                continue  # preempted: its first token came in time
            waited = now - request.arrival_time
            if waited < deadline:
                return
            request.error = (
                f"request {request.request_id!r} waited {waited:.1f} s without starting, past "
                f"the engine's first-token deadline of {deadline:g} s: the engine is "
                "overloaded, retry later"
            )
            request.error_type = ERROR_DEADLINE
            self.waiting.remove(request)
            batch.failed.append(request)

    def _admit_now(self, batch: ScheduledBatch) -> bool:
        """Whether new prompts join this step. With a prefill batch window, a pure decode
        step (which replays as a CUDA graph) is not turned into a mixed step (which runs
        eagerly, several times slower) for every arrival: prompts wait until the oldest has
        waited the window, then go in together. With an admission interval, a nearly full
        batch (fewer than max_num_seqs / 8 free slots) admits at most once per interval."""
        if not self.waiting or not batch.requests:
            return bool(self.waiting)
        if any(n > 1 for n in batch.num_scheduled):
            return True  # a prefill chunk runs this step anyway
        return not self._holding()

    def holds_prompts(self) -> bool:
        """Prompts are waiting, and a pure decode step now would keep them waiting (the
        prefill window or the admission interval), or there is no sequence slot for them."""
        if not self.waiting:
            return False
        return len(self.running) >= self.config.max_num_seqs or (
            bool(self.running) and self._holding()
        )

    def _holding(self) -> bool:
        now = self.clock()
        window = self.config.prefill_batch_window
        if window > 0 and now - self.waiting[0].arrival_time < window:
            return True
        interval = self.config.admission_interval
        if interval > 0 and now - self._last_admission < interval:
            free = self.config.max_num_seqs - len(self.running)
            return free < max(1, self.config.max_num_seqs // 8)
        return False

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow_or_preempt(request, request.num_computed_tokens + n, batch):
                break  # ``request`` itself was preempted: it was the newest
            batch.add(request, n)
            budget -= n
            i += 1
        return budget

    def _grow_or_preempt(self, request: Request, num_tokens: int, batch: ScheduledBatch) -> bool:
        while not self.kv.allocate(request, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        logger.debug("preempting %s (%d tokens)", request.request_id, request.num_tokens)
        self.kv.free(request)
        self._unpin(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _schedule_waiting(
        self,
        batch: ScheduledBatch,
        budget: int,
        ready: Callable[[Request, ScheduledBatch], bool] | None = None,
        always_reserve: bool = False,
    ) -> str | None:
        """Start waiting requests whose adapter ``ready`` says is (default
        ``_adapter_ready``: starts loads, fails what cannot load); the first adapter a
        request was left waiting for with a sequence slot free, if any. The watermark of
        free pages is kept once a request runs (``always_reserve``: from the start)."""
        ready = ready or self._adapter_ready
        skipped = 0
        not_ready: dict[str, None] = {}  # (in queue order)
        for request in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            # An adapter found not ready stays so for the rest of this pass: a background load
            # finishing mid-pass must not let a later request of that adapter overtake an
            # earlier one.
            if request.adapter in not_ready or not ready(request, batch):
                if not (batch.failed and batch.failed[-1] is request):
                    not_ready[request.adapter] = None
                # Look only a few adapters ahead: loading for the whole queue would make the
                # queue's adapters evict each other from the pool.
                skipped += 1
                if skipped >= self.lookahead:
                    break
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            end = request.num_computed_tokens + n
            reserve = self.watermark_pages if always_reserve or self.running else 0
            if self.kv.pool.num_free < self.kv.extra_blocks(request, end) + reserve:
                break
            if not self.kv.allocate(request, end):
                break
            self._start(request, batch, n)
            budget -= n
        return next(iter(not_ready), None)

    def admit_ready(self, budget: int) -> ScheduledBatch:
        """Admit waiting prompts for a step queued ahead (LLMEngine._launch_next), in arrival
        order, as ``_schedule_waiting`` does but without starting loads or failing anything:
        a request whose adapter is not resident and copied yet is passed over (with every
        later request of that adapter, so each adapter's requests keep their order), at most
        ``lookahead`` of them; the pass stops at the first request that the token budget, a
        sequence slot or its pages cannot take. (Until GPU session 12 it stopped at the
        first not-ready adapter; passing over them did not change how many requests S1's
        saturated n = 2000 run admitted per pass: 6.4-6.5 either way, base 8.4.)"""
        batch = ScheduledBatch()
        waited = self._schedule_waiting(batch, budget, self._resident_ready, always_reserve=True)
        if waited is not None:
            self.stats.adapter_wait(self.adapters.stage(waited))
        self.stats.admissions += bool(batch.requests)
        return batch

    def _resident_ready(self, request: Request, batch: ScheduledBatch) -> bool:
        """``request``'s adapter (if any) is resident and copied; no load starts here."""
        if request.adapter is None:
            return True
        if not self.adapters.is_ready(request.adapter):
            return False
        if not request.adapter_looked_up:  # as _adapter_ready counts it
            request.adapter_looked_up = True
            self.adapters.cache.stats.gpu_hits += 1
        return True

    def only_loading(self) -> bool:
        """Every request within the lookahead waits for an adapter that is on its way to the
        pool (an I/O thread reading it, packed, or its copy in flight): nothing for a
        normal scheduling pass to do that the prefetch does not (no load to start, no
        failure to report, no ready request that did not fit)."""
        if self.adapters is None or not self.waiting:
            return False
        for i, request in enumerate(self.waiting):
            if i >= self.lookahead:
                break
            if request.adapter is None:
                return False
            if self.adapters.stage(request.adapter) not in ("reading", "packed", "copying"):
                return False
        return True

    def _start(self, request: Request, batch: ScheduledBatch, n: int) -> None:
        """Move an admitted request from the queue into the batch."""
        self.waiting.remove(request)
        self._pin(request)
        self.stats.started += 1
        self._last_admission = self.clock()
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self._last_admission
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        batch.add(request, n)

    def _adapter_ready(self, request: Request, batch: ScheduledBatch) -> bool:
        if request.adapter is None:
            return True
        if not request.adapter_looked_up:
            request.adapter_looked_up = True
            stats = self.adapters.cache.stats
            if request.adapter in self.adapters.cache:
                stats.gpu_hits += 1
            else:
                stats.gpu_misses += 1
        try:
            return self.adapters.ensure(request.adapter)
        except AdapterLoadError as e:
            request.error = str(e)
            request.error_type = ERROR_ADAPTER
            self.waiting.remove(request)
            batch.failed.append(request)
            return False

    def waiting_adapters(self, limit: int) -> list[str]:
        """The first ``limit`` distinct adapters of queued requests, in queue order, for
        prefetching."""
        names: dict[str, None] = {}
        for request in self.waiting:
            if len(names) >= limit:
                break
            if request.adapter is not None:
                names[request.adapter] = None
        return list(names)

    def _pin(self, request: Request) -> None:
        if request.adapter is not None:
            request.adapter_slot = self.adapters.cache.acquire(request.adapter)

    def _unpin(self, request: Request) -> None:
        if request.adapter_slot is not None:
            self.adapters.cache.release(request.adapter)
            request.adapter_slot = None

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and return its pages."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        self._unpin(request)
        request.status = RequestStatus.FINISHED
