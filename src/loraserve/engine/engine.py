"""LLMEngine: requests in, one step at a time, outputs back.

add_request ──> Scheduler.waiting ──schedule()──> ModelRunner.step ──> sample
                     ^      │ (pages from the PagePool)                  │
                     └──────┴── preempted: back to the queue   append token, check stops
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraserve.adapters.store import AdapterStore
from loraserve.config import CacheConfig, EngineConfig, ModelConfig
from loraserve.engine.adapters import AdapterManager
from loraserve.engine.graphs import DecodeGraphs
from loraserve.engine.precompile import precompile
from loraserve.engine.prefill_graphs import PrefillGraphs
from loraserve.engine.runner import ModelRunner, PendingStep
from loraserve.engine.sampler import Sampler
from loraserve.engine.scheduler import ScheduledBatch, Scheduler
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.kv_cache import KVCacheManager
from loraserve.memory.pool import PageKind, PagePool, kv_page_elems, pages_for_budget
from loraserve.model.llama import LlamaForCausalLM
from loraserve.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
)
from loraserve.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class PromptError(ValueError):
    """A prompt that this engine cannot serve (too long, bad token ids, ...)."""


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    stop_strings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StepTiming:
    """Host wall time of one ``LLMEngine.step``, in seconds, by phase.

    ``launch`` is the host's work to enqueue the forward pass and sampling (building inputs,
    launching kernels or replaying a graph); ``wait`` is the time spent blocked on the
    device afterwards (minus the adapter prefetch done meanwhile). A step whose ``wait``
    is near zero was host-bound: the device finished before the host had enqueued it all.
    """

    schedule: float  # the scheduler's pass (admission, preemption, adapter readiness)
    launch: float
    prefetch: float  # queued requests' adapter loads moved on, while the device runs and after
    wait: float  # blocked on the device until the sampled tokens were on the host
    finish: float  # appending tokens, stop checks, detokenising, outputs

    @property
    def total(self) -> float:
        return self.schedule + self.launch + self.prefetch + self.wait + self.finish


@dataclass
class DeviceTiming:
    """Device time of the step the latest ``LLMEngine.step`` collected, in milliseconds
    (with ``LLMEngine.time_device``, on CUDA): ``busy`` from the device reaching the step
    to its last kernel (stream waits inside it count), ``idle`` since the step collected
    before it ended (the device had nothing queued)."""

    busy: float
    idle: float


@dataclass
class LaunchStats:
    """How steps were launched, counted since the engine was made (with ``overlap_steps``):
    ``ahead`` steps were queued behind the step before them, so the device found them
    waiting; the other steps were launched only after the previous one's results came
    back (the device idle for the host's finish, schedule and launch), by why the step
    before could not queue them (``LLMEngine._launch_next``)."""

    ahead: int = 0
    # ... of which queued with prompts waiting for adapters still loading (no prompt ready)
    ahead_while_loading: int = 0
    # prompts to admit, and overlapped admission off (or a first-token deadline set)
    not_ahead_admission_off: int = 0
    # the running set changed: a request admitted, preempted or mid-prefill last step
    not_ahead_batch_changed: int = 0
    not_ahead_no_graph: int = 0  # the decode batch has no graph (too large)
    not_ahead_no_page: int = 0  # a running request's next page not free without preempting
    # prompts to admit, none of them ready (adapter still loading) or fitting
    not_ahead_no_ready_prompt: int = 0

    def not_ahead(self, reason: str) -> None:
        name = f"not_ahead_{reason}"
        setattr(self, name, getattr(self, name) + 1)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model: LlamaForCausalLM,
        tokenizer: Tokenizer | None,
        model_path: str = "",
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.device = torch.device(config.device)
        mc = config.model
        page_elems = kv_page_elems(
            mc.num_hidden_layers, config.cache.block_size, mc.num_key_value_heads, mc.head_dim
        )
        num_pages = _num_pages(config, page_elems)
        self.pool = PagePool(num_pages, page_elems, config.dtype, self.device)
        kv = self.pool.kv_view(
            mc.num_hidden_layers, config.cache.block_size, mc.num_key_value_heads, mc.head_dim
        )
        model.bind_kv_cache(kv, backend=config.attention_backend)
        if config.lora_side_stream and self.device.type == "cuda":
            model.set_lora_stream(torch.cuda.Stream(self.device))
        self.kv = KVCacheManager(self.pool, config.cache.block_size)
        self.adapter_store = AdapterStore(
            mc, config.dtype, config.lora.host_cache_bytes, pin_memory=self.device.type == "cuda"
        )
        self.adapter_cache = AdapterCache(
            self._adapter_pool(page_elems), mc, config.lora.max_loras, config.lora.max_lora_rank
        )
        self.adapter_cache.rank_pack = config.lora_rank_pack
        self.adapter_cache.fused_decode = config.lora_fused_decode
        self.adapter_cache.fused_max_rank = config.lora_fused_max_rank
        # the padded bmm ablation pads every adapter to the tables' width
        self.adapter_cache.narrow_tiles = config.lora_backend != "bmm"
        self.adapters = AdapterManager(
            self.adapter_store,
            self.adapter_cache,
            threads=config.lora.io_threads,
            copy_in_wait=config.lora.copy_in_wait,
        )
        self._prefetch_names: list[str] = []  # the latest _prefetch's, in order of need
        self.scheduler = Scheduler(config.scheduler, self.kv, self.adapters)
        self.last_step = StepTiming(0.0, 0.0, 0.0, 0.0, 0.0)  # of the latest step()
        # A decode step launched behind the one the latest step() returned (overlap_steps).
        self._inflight: tuple[ScheduledBatch, PendingStep] | None = None
        self.launch_stats = LaunchStats()
        # Record CUDA timing events around each step (the bench's device timeline): the
        # collected step's device time lands in last_device.
        self.time_device = False
        self.last_device: DeviceTiming | None = None
        self._last_end: torch.cuda.Event | None = None
        self.sampler = Sampler(self.device, seed=config.seed)
        self.runner = ModelRunner(
            model,
            config.cache.block_size,
            self.device,
            self.sampler,
            self.adapter_cache,
            config.lora_backend,
            graphs=self._decode_graphs(),
            mixed_decode_graphs=config.mixed_decode_graphs,
        )
        if config.prefill_graphs:
            self.runner.prefill_graphs = self._prefill_graphs()
        self.eos_token_ids = frozenset(mc.eos_token_ids) | (
            tokenizer.eos_token_ids if tokenizer else frozenset()
        )
        self._requests: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        if self.device.type == "cuda":
            self._precompile()
            gc.collect()  # earlier engines' graphs and pools, freed before the captures
        if self.runner.graphs is not None:
            self.runner.graphs.capture_all()
        if self.runner.prefill_graphs is not None:
            self.runner.prefill_graphs.capture_all()
        logger.info(
            "page pool: %d pages of %.1f KiB (%d tokens each), %.2f GiB on %s",
            num_pages,
            self.pool.page_bytes / 1024,
            config.cache.block_size,
            num_pages * self.pool.page_bytes / 2**30,
            self.device,
        )

    def _precompile(self) -> None:
        """Compile the kernel variants of eager steps now, not mid-serving (precompile.py)."""
        sched = self.config.scheduler
        precompile(
            self.model,
            self.pool,
            self.adapter_cache,
            self.config.lora_backend,
            self.config.cache.block_size,
            self.max_model_len,
            sched.max_num_batched_tokens,
            sched.max_num_seqs,
            sched.max_num_seqs,  # mixed steps run their decode rows' LoRA in decode form
        )

    def _decode_graphs(self) -> DecodeGraphs | None:
        max_batch = min(self.config.cuda_graph_max_batch, self.config.scheduler.max_num_seqs)
        if max_batch <= 0:
            return None
        scratch = self.pool.allocate(1, PageKind.RESERVED)
        if scratch is None:
            raise ValueError("the page pool has no page left for the CUDA-graph scratch page")
        block_size = self.config.cache.block_size
        return DecodeGraphs(
            self.model,
            self.adapter_cache,
            self.config.lora_backend,
            block_size,
            -(-self.max_model_len // block_size),
            scratch[0],
            max_batch,
            self.device,
            self.config.group_lora_rows,
        )

    def _prefill_graphs(self) -> PrefillGraphs:
        graphs = self.runner.graphs  # shares the decode graphs' scratch page
        return PrefillGraphs(
            self.model,
            self.adapter_cache,
            self.config.lora_backend,
            graphs.block_size,
            graphs.max_blocks,
            graphs.scratch_page,
            min(self.config.scheduler.max_num_batched_tokens, self.max_model_len),
            self.device,
        )

    def _adapter_pool(self, page_elems: int) -> PagePool:
        """The page pool itself (unified paging) or, with ``lora.adapter_pool_bytes``, a
        second pool of the same page size that only adapters use (a static split)."""
        nbytes = self.config.lora.adapter_pool_bytes
        if nbytes is None:
            return self.pool
        pages = pages_for_budget(nbytes, page_elems, self.config.dtype)
        if pages < 1:
            raise ValueError(
                f"adapter_pool_bytes={nbytes} is smaller than one page "
                f"({self.pool.page_bytes} bytes)"
            )
        logger.info("separate adapter pool: %d pages", pages)
        return PagePool(pages, page_elems, self.config.dtype, self.device)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    # ---- requests -------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> str:
        """Queue a request; returns its id. ``adapter`` names a registered adapter (None:
        the base model). Raises KeyError for an unknown adapter, PromptError / ValueError
        for bad input (nothing else in the engine is affected)."""
        params = params or SamplingParams()
        params.validate()
        self.check_adapter(adapter)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self._tokenize(prompt)
        self._check_fits(token_ids, params)
        request = Request(request_id, token_ids, params, prompt=text, adapter=adapter)
        if params.seed is not None:
            request.generator = self.sampler.make_generator(params.seed)
        detok = (
            IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            if self.tokenizer
            else None
        )
        self._requests[request_id] = _Tracked(request, detok, stop_strings=list(params.stop))
        self.scheduler.add(request)
        return request_id

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError(
                    f"the model at {self.model_path!r} has no tokenizer.json: "
                    "send prompts as lists of token ids"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.config.model.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise PromptError(
                    f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
                )
        if not ids:
            raise PromptError("the prompt is empty: give at least one token")
        return ids

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        n = len(token_ids)
        if n >= self.max_model_len:
            raise PromptError(
                f"the prompt has {n} tokens but the context window (max_model_len) is "
                f"{self.max_model_len}: shorten it to at most {self.max_model_len - 1} tokens"
            )
        longest = min(n + params.max_tokens, self.max_model_len)
        pages = self.kv.blocks_needed(longest)
        if pages > self.pool.num_pages:
            raise PromptError(
                f"the request needs up to {longest} tokens ({pages} pages) but the page pool has "
                f"{self.pool.num_pages} pages: lower max_tokens or give the pool more memory"
            )

    def check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapter_store:
            known = ", ".join(sorted(self.adapter_store.names())[:10]) or "none"
            raise KeyError(f"unknown adapter {adapter!r} (registered: {known})")

    # ---- adapters ---------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Register a PEFT adapter directory under ``name`` (reads only its config)."""
        self.adapter_store.register(name, path)
        self.adapters.clear_failure(name)

    def remove_adapter(self, name: str) -> None:
        """Unregister ``name``. Raises RuntimeError while requests still use it; see
        ``adapter_in_use``."""
        if self.adapter_in_use(name):
            raise RuntimeError(f"adapter {name!r} is still used by queued or running requests")
        self.adapters.forget(name)
        self.adapter_store.unregister(name)

    def adapter_in_use(self, name: str) -> bool:
        return any(t.request.adapter == name for t in self._requests.values())

    def abort(self, request_id: str) -> None:
        tracked = self._requests.pop(request_id, None)
        if tracked is None or tracked.request.finished:
            return
        tracked.request.finish_reason = FinishReason.ABORT
        self.scheduler.finish(tracked.request)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def drain(self) -> None:
        """Wait for a decode step still queued behind the last ``step()`` whose requests
        have all finished since (overlapped steps), and drop its results."""
        if self._inflight is not None and all(r.finished for r in self._inflight[0].requests):
            _, pending = self._inflight
            self._inflight = None
            self.runner.collect(pending)

    # ---- the step loop -----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that got a new token or
        failed. ``last_step`` holds where its wall time went."""
        clock = time.perf_counter
        t0 = clock()
        self.drain()  # a queued step of requests that have all finished since: not ours
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            scheduled = self.scheduler.schedule()
            outputs = [self._fail(r) for r in scheduled.failed]
            t1 = clock()
            if scheduled.empty:
                self._prefetch()
                self.last_step = StepTiming(t1 - t0, 0.0, clock() - t1, 0.0, 0.0)
                return outputs
            pending = self._launch(self.runner.launch, scheduled)
        else:  # launched by the previous call, behind the step it returned
            scheduled, pending = inflight
            outputs = []
            t1 = t0
            self.launch_stats.ahead += 1
        if self.config.overlap_steps and pending.samples is not None:
            self._inflight = self._launch_next(pending)
        t2 = clock()
        # The device is computing: bring the queue's adapters closer meanwhile.
        self._prefetch()
        t3 = clock()
        # Adapters packed while the device computes get their pages and copies on the I/O
        # threads that packed them.
        with self.adapters.device_wait(self._prefetch_names):
            result = self.runner.collect(pending)
        t4 = clock()
        self._device_time(pending)
        # Loads packed while the device computed get their pages and copies now, so the
        # next step's admission finds them ready, not the one after it.
        self._prefetch()
        t5 = clock()
        for request, n in zip(scheduled.requests, scheduled.num_scheduled, strict=True):
            if not request.finished:  # (aborted while its step ran)
                request.num_computed_tokens += n
        for request, token, logprobs in zip(
            result.sampled, result.token_ids, result.logprobs, strict=True
        ):
            if request.finished:  # aborted, or a continued step's row past its last token
                continue
            tracked = self._requests[request.request_id]
            self._append(tracked, token, logprobs)
            outputs.append(self._output(tracked))
            if request.finished:
                del self._requests[request.request_id]
        self.last_step = StepTiming(t1 - t0, t2 - t1, t3 - t2 + t5 - t4, t4 - t3, clock() - t5)
        return outputs

    def _prefetch(self) -> None:
        """Move the loads of the queue's first ``lora.prefetch`` adapters on."""
        self._prefetch_names = self.scheduler.waiting_adapters(self.config.lora.prefetch)
        self.adapters.prefetch(self._prefetch_names)

    def _launch_next(self, pending: PendingStep) -> tuple[ScheduledBatch, PendingStep] | None:
        """Overlapped decode: enqueue the graphed decode step after ``pending`` before
        waiting for it, so the device finds it queued and the host's bookkeeping of
        ``pending`` (tokens, stop checks, outputs) and its filling of this step run while the
        device computes. ``pending`` may be a decode step or a prefill/mixed one.

        Only when the next step would be that decode batch anyway: every running request
        samples a token in ``pending`` (no prompt is left half prefilled), no prompt would be
        admitted (none waiting, no free sequence slot, or the prefill window / admission
        interval holds them: they join one step later than the window says at most) unless
        with overlap_admission (ready prompts join the step; with none ready, it is queued
        while the queue's adapters are all still loading: ``Scheduler.only_loading``), and
        each request's next page can be had without preempting. Requests whose
        ``pending`` token is their last by length (max_tokens, max_model_len) are left out;
        one that stops on a token (EOS, a stop string) only learns it after this step is
        queued: its row in it is computed and dropped. Its pages are freed meanwhile, but
        anything that reuses them is queued behind this step on the device.
        """
        sched = self.scheduler
        admit = bool(sched.waiting) and (
            self.config.scheduler.ttft_deadline is not None or not sched.holds_prompts()
        )
        stats = self.launch_stats
        if admit and (
            not self.config.overlap_admission or self.config.scheduler.ttft_deadline is not None
        ):
            stats.not_ahead("admission_off")
            return None
        rows = {id(r) for r in pending.sampled}
        if any(id(r) not in rows for r in sched.running):
            stats.not_ahead("batch_changed")
            return None
        requests = [
            r
            for r in pending.sampled
            if not r.finished
            and len(r.output_token_ids) + 1 < r.params.max_tokens
            and r.num_tokens + 1 < self.max_model_len
        ]
        if not (requests or admit):
            return None  # nothing left to run
        if not self.runner.fits_graphs(len(requests)):
            stats.not_ahead("no_graph")
            return None
        for r in requests:  # one more token: the one ``pending`` samples
            if not self.kv.allocate(r, r.num_tokens + 1):
                stats.not_ahead("no_page")
                return None  # no preemption on a guess: the next call schedules normally
        batch = ScheduledBatch(list(requests), [1] * len(requests))
        prompts = None
        if admit:  # (overlap_admission) prompts whose adapters are ready, after those rows
            budget = self.config.scheduler.max_num_batched_tokens - len(requests)
            prompts = sched.admit_ready(budget)
            if prompts.requests:
                for r, n in zip(prompts.requests, prompts.num_scheduled, strict=True):
                    batch.add(r, n)
            elif requests and self.config.lora.prefetch and sched.only_loading():
                # The queue's adapters are all on their way, moved on by each step's
                # prefetch: decode ahead meanwhile (a normal pass would only wait with the
                # device idle for its launch).
                stats.ahead_while_loading += 1
                prompts = None
            else:
                # No waiting prompt is ready (or the first ready one does not fit), and a
                # normal pass has work: adapter loads to start, failures to report.
                stats.not_ahead("no_ready_prompt")
                return None
        return batch, self._launch(self.runner.launch_next, pending, requests, prompts)

    def _launch(self, launch: Callable[..., PendingStep], *args: Any) -> PendingStep:
        """``launch(*args)``, then a fence in the page pools (pages freed before it are
        free of the step). With ``time_device`` (CUDA), between two timing events."""
        timed = self.time_device and self.device.type == "cuda"
        if timed:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        pending = launch(*args)
        if timed:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            pending.events = (start, end)
        self.pool.fence()
        if self.adapter_cache.pool is not self.pool:
            self.adapter_cache.pool.fence()
        return pending

    def _device_time(self, pending: PendingStep) -> None:
        """After ``pending`` was collected (its events have completed): ``last_device``."""
        if pending.events is None:
            self.last_device = None
            return
        start, end = pending.events
        end.synchronize()  # (complete: the step's samples were)
        idle = 0.0 if self._last_end is None else max(0.0, self._last_end.elapsed_time(start))
        self.last_device = DeviceTiming(start.elapsed_time(end), idle)
        self._last_end = end

    def _fail(self, request: Request) -> RequestOutput:
        request.finish_reason = FinishReason.ERROR
        self.scheduler.finish(request)
        tracked = self._requests.pop(request.request_id)
        return self._output(tracked)

    def _append(self, tracked: _Tracked, token: int, logprobs: dict[int, float] | None) -> None:
        request = tracked.request
        params = request.params
        request.output_token_ids.append(token)
        if logprobs is not None:
            request.output_logprobs.append(logprobs)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        reason, stop = self._stop_reason(tracked, token)
        if reason is None and len(request.output_token_ids) >= params.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None and request.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            if tracked.detokenizer is not None and not isinstance(stop, str):
                tracked.text += tracked.detokenizer.flush()  # a trailing partial character
            request.finish_reason, request.stop_reason = reason, stop
            self.scheduler.finish(request)

    def _stop_reason(
        self, tracked: _Tracked, token: int
    ) -> tuple[FinishReason | None, str | int | None]:
        params = tracked.request.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP, None
        if token in params.stop_token_ids:
            return FinishReason.STOP, token
        if tracked.detokenizer is None:
            return None, None
        before = len(tracked.text)
        tracked.text += tracked.detokenizer.add(token)
        return self._stop_string(tracked, before)

    def _stop_string(
        self, tracked: _Tracked, before: int
    ) -> tuple[FinishReason | None, str | None]:
        for stop in tracked.stop_strings:
            start = tracked.text.find(stop, max(0, before - len(stop) + 1))
            if start >= 0:
                end = (
                    start + len(stop)
                    if tracked.request.params.include_stop_str_in_output
                    else start
                )
                tracked.text = tracked.text[:end]
                return FinishReason.STOP, stop
        return None, None

    def _output(self, tracked: _Tracked) -> RequestOutput:
        r = tracked.request
        return RequestOutput(
            request_id=r.request_id,
            prompt=r.prompt,
            prompt_token_ids=r.prompt_token_ids,
            text=self._visible_text(tracked),
            token_ids=list(r.output_token_ids),
            logprobs=list(r.output_logprobs) if r.params.logprobs is not None else None,
            finished=r.finished,
            finish_reason=r.finish_reason.value if r.finish_reason else None,
            stop_reason=r.stop_reason,
            error=r.error,
            error_type=r.error_type,
            num_preemptions=r.num_preemptions,
            adapter=r.adapter,
            time_in_queue=(
                None if r.first_scheduled_time is None else r.first_scheduled_time - r.arrival_time
            ),
        )

    def _visible_text(self, tracked: _Tracked) -> str:
        """While a stop string could still be forming at the end of the text, hold that
        tail back (streaming clients must never see text that a stop string removes)."""
        text = tracked.text
        if tracked.request.finished or not tracked.stop_strings:
            return text
        hold = 0
        for stop in tracked.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold]

    def shutdown(self) -> None:
        """Stop the adapter I/O threads and drop the CUDA graphs (their memory pool), so
        the device memory is free once the engine is released."""
        self.adapters.shutdown()
        self._inflight = None
        self.runner.graphs = None
        self.runner.prefill_graphs = None

    def check_integrity(self) -> None:
        """Pages in use are exactly the block tables of running requests plus the pages of
        resident adapters; adapter pins match the running requests."""
        self.pool.check_integrity()
        self.adapter_cache.check_integrity()
        if self.adapter_cache.pool is not self.pool:
            self.adapter_cache.pool.check_integrity()
            assert self.pool.num_used(PageKind.ADAPTER) == 0, "adapter pages in the KV pool"
        pins: dict[str, int] = {}
        for r in self.scheduler.running:
            if r.adapter is not None:
                pins[r.adapter] = pins.get(r.adapter, 0) + 1
        for adapter in self.adapter_cache.resident():
            assert adapter.refcount == pins.get(adapter.name, 0), (
                f"adapter {adapter.name!r} pinned {adapter.refcount} times, "
                f"used by {pins.get(adapter.name, 0)} running requests"
            )
        held = [p for r in self.scheduler.running for p in r.block_table]
        held += [p for r in self.scheduler.waiting for p in r.block_table]
        assert len(held) == len(set(held)), "a KV page is in two block tables"
        assert self.pool.num_used(PageKind.KV) == len(held), (
            f"{self.pool.num_used(PageKind.KV)} KV pages in use, {len(held)} in block tables"
        )


def _num_pages(config: EngineConfig, page_elems: int) -> int:
    cache: CacheConfig = config.cache
    useful = config.scheduler.max_num_seqs * -(-config.max_model_len // cache.block_size) + 1
    if cache.num_pages is not None:
        return cache.num_pages
    if cache.pool_bytes is not None:
        budget = cache.pool_bytes
    elif config.device.startswith("cuda"):
        budget = _cuda_budget(config)
    else:
        budget = cache.cpu_pool_bytes
    budget -= config.lora.adapter_pool_bytes or 0  # a separate adapter pool takes its share
    pages = min(pages_for_budget(budget, page_elems, config.dtype), useful)
    if pages < 1:
        raise ValueError(
            f"the page pool budget ({budget} bytes) is smaller than one page: give more memory"
        )
    return pages


def _cuda_budget(config: EngineConfig) -> int:
    """Bytes for the pool: the share of device memory we may use, less what is in use
    (weights) and an estimate of the activations of the largest step."""
    device = torch.device(config.device)
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    mc: ModelConfig = config.model
    itemsize = torch.tensor([], dtype=config.dtype).element_size()
    tokens = config.scheduler.max_num_batched_tokens
    per_token = (
        mc.q_size + 2 * mc.kv_size + 4 * mc.intermediate_size + 4 * mc.hidden_size
    ) * itemsize
    logits = config.scheduler.max_num_seqs * mc.vocab_size * 4 * 4
    reserve = tokens * per_token * 2 + logits + (512 << 20)
    return int(total * config.cache.gpu_memory_utilization) - in_use - reserve


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        from loraserve.model.embedded import embedded_model_dir

        return embedded_model_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {model!r} not found: give a local HF model directory "
            "(config.json + *.safetensors), or no model for the embedded default"
        )
    return path
