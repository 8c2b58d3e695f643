"""Prometheus metrics of one server, in the app's own CollectorRegistry.

Three sources:
- per request, on the event loop (``track``): requests, prompt and generation tokens
  (labelled by model_name and adapter; "" is the base model), time to first token, time per
  output token, end-to-end latency;
- per engine step, on the engine thread (``on_step``): sequences and distinct adapters per
  step (histograms and their maxima since start), step time;
- per scrape (``_EngineCollector``), from AsyncEngine.stats: running/waiting requests, page
  pool use (KV, adapters, total), adapter cache counters of the GPU and host tiers, and the
  gauges the Kubernetes Gateway API Inference Extension reads from vLLM
  (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``,
  ``vllm:lora_requests_info``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraserve.request import RequestOutput
from loraserve.server.async_engine import AsyncEngine, EngineStats, StepStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
_LATENCY_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The metrics of one app; ``render()`` is the body of GET /metrics."""

    def __init__(self, model_name: str, engine: AsyncEngine) -> None:
        self.model_name = model_name
        self.registry = registry = CollectorRegistry()
        labels = ["model_name", "adapter"]
        self.requests = Counter(
            "loraserve:requests",
            "Requests ended, by finish reason (stop, length, error, abort)",
            [*labels, "finish_reason"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "loraserve:prompt_tokens", "Prompt tokens processed", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "loraserve:generation_tokens", "Tokens generated", labels, registry=registry
        )
        self.ttft = _histogram(
            "loraserve:time_to_first_token_seconds", "From arrival to the first token", registry
        )
        self.tpot = _histogram(
            "loraserve:time_per_output_token_seconds", "Between successive tokens", registry
        )
        self.e2e = _histogram(
            "loraserve:e2e_request_latency_seconds", "From arrival to the end", registry
        )
        self.step_seconds = _histogram("loraserve:step_seconds", "One engine step", registry)
        self.step_phase_seconds = Counter(
            "loraserve:step_phase_seconds",
            "Engine step time by phase: schedule, launch (host work to enqueue the step), "
            "prefetch, wait (blocked on the device), finish. Little wait: the host sets the pace",
            ["phase"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "loraserve:batch_size",
            "Sequences that got a token in one engine step",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_adapters = Histogram(
            "loraserve:batch_adapters",
            "Distinct adapters among the sequences of one engine step",
            buckets=(0, *_BATCH_BUCKETS),
            registry=registry,
        )
        self.max_batch_size = Gauge(
            "loraserve:max_batch_size", "Most sequences in one step since start", registry=registry
        )
        self.max_batch_adapters = Gauge(
            "loraserve:max_batch_adapters",
            "Most distinct adapters in one step since start",
            registry=registry,
        )
        self._max_batch = self._max_adapters = 0  # written by the engine thread only
        registry.register(_EngineCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_step(self, step: StepStats) -> None:
        """Engine-thread listener (AsyncEngine.on_step)."""
        n = len(step.outputs)
        adapters = len({o.adapter for o in step.outputs if o.adapter is not None})
        self.batch_size.observe(n)
        self.batch_adapters.observe(adapters)
        self.step_seconds.observe(step.seconds)
        if step.timing is not None:
            for phase in dataclasses.fields(step.timing):
                self.step_phase_seconds.labels(phase.name).inc(getattr(step.timing, phase.name))
        if n > self._max_batch:
            self._max_batch = n
            self.max_batch_size.set(n)
        if adapters > self._max_adapters:
            self._max_adapters = adapters
            self.max_batch_adapters.set(adapters)

    async def track(
        self, stream: AsyncIterator[RequestOutput], adapter: str | None, arrival: float
    ) -> AsyncIterator[RequestOutput]:
        """Pass ``stream`` through, recording the request's metrics. ``arrival`` is the
        time.monotonic() at which the HTTP request arrived."""
        labels = (self.model_name, adapter or "")
        seen, last, reason = 0, arrival, "abort"
        try:
            async for out in stream:
                now = time.monotonic()
                new = len(out.token_ids) - seen
                if new > 0:
                    self._tokens(labels, out, seen, new, now - (arrival if seen == 0 else last))
                    seen, last = len(out.token_ids), now
                if out.finished:
                    reason = out.finish_reason or "stop"
                yield out
        finally:
            self.requests.labels(*labels, reason).inc()
            self.e2e.observe(time.monotonic() - arrival)

    def _tokens(
        self, labels: tuple[str, str], out: RequestOutput, seen: int, new: int, elapsed: float
    ) -> None:
        if seen == 0:
            self.ttft.observe(elapsed)
            self.prompt_tokens.labels(*labels).inc(len(out.prompt_token_ids))
        else:
            for _ in range(new):
                self.tpot.observe(elapsed / new)
        self.generation_tokens.labels(*labels).inc(new)


def _histogram(name: str, doc: str, registry: CollectorRegistry) -> Histogram:
    return Histogram(name, doc, buckets=_LATENCY_BUCKETS, registry=registry)


class _EngineCollector(Collector):
    """Reads the engine's latest snapshot at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats
        yield from self._requests(s)
        yield from self._pages(s)
        yield from self._adapters(s)
        yield _lora_requests_info(s)

    def _requests(self, s: EngineStats) -> Iterator[Metric]:
        for prefix in ("loraserve", "vllm"):
            for what, value in (("running", s.num_running), ("waiting", s.num_waiting)):
                gauge = GaugeMetricFamily(
                    f"{prefix}:num_requests_{what}",
                    f"Requests {what} in the engine",
                    labels=["model_name"],
                )
                gauge.add_metric([self.model_name], value)
                yield gauge

    def _pages(self, s: EngineStats) -> Iterator[Metric]:
        yield GaugeMetricFamily("loraserve:pages_total", "Pages in the pool", value=s.pages_total)
        used = GaugeMetricFamily("loraserve:pages_used", "Pages in use", labels=["kind"])
        used.add_metric(["kv"], s.pages_kv)
        used.add_metric(["adapter"], s.pages_adapter)
        yield used
        yield GaugeMetricFamily(
            "loraserve:pages_free", "Free pages in the pool", value=s.pages_free
        )
        usage = s.pages_kv / s.pages_total if s.pages_total else 0.0
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            yield GaugeMetricFamily(name, "Share of the page pool holding KV (0-1)", value=usage)

    def _adapters(self, s: EngineStats) -> Iterator[Metric]:
        gpu, host = s.gpu, s.host
        rows = (
            ("hits", "Adapter lookups served by the tier", gpu.gpu_hits, host.host_hits),
            (
                "misses",
                "Adapter lookups the tier could not serve",
                gpu.gpu_misses,
                host.host_misses,
            ),
            ("loads", "Adapters loaded into the tier", gpu.gpu_loads, host.disk_loads),
            ("evictions", "Adapters evicted from the tier", gpu.gpu_evictions, host.host_evictions),
        )
        for what, doc, on_gpu, on_host in rows:
            counter = CounterMetricFamily(f"loraserve:adapter_cache_{what}", doc, labels=["tier"])
            counter.add_metric(["gpu"], on_gpu)
            counter.add_metric(["host"], on_host)
            yield counter
        yield CounterMetricFamily(
            "loraserve:adapter_load_failures", "Adapter loads that failed", value=gpu.load_failures
        )
        yield GaugeMetricFamily(
            "loraserve:adapters_registered", "Adapters served", value=s.adapters_registered
        )
        yield GaugeMetricFamily(
            "loraserve:adapters_resident",
            "Adapters resident in the page pool",
            value=s.adapters_resident,
        )
        yield GaugeMetricFamily(
            "loraserve:adapter_host_bytes",
            "Bytes of adapters in host memory",
            value=host.host_bytes,
        )


def _lora_requests_info(s: EngineStats) -> Metric:
    """vLLM's gauge, as the Gateway API Inference Extension reads it: the labels carry the
    adapters of running and waiting requests, the value is the time of the snapshot."""
    info = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    info.add_metric(
        [str(s.max_loras), ",".join(s.running_adapters), ",".join(s.waiting_adapters)], s.time
    )
    return info
