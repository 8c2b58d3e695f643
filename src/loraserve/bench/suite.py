"""``loraserve bench``: for every point of a sweep, one trace, run by loraserve and by each
baseline asked for, one after the other on the same device.

    point (n, rate) -> trace -> loraserve  (in-process engine, or the server at --url)
                             -> base       (same engine, every request on the base model)
                             -> padded     (lora_backend="bmm": adapters padded to the max rank)
                             -> separate   (adapters in their own pool, apart from the KV cache)
                             -> peft       (HF transformers + PEFT, FIFO mixed batches)

Each engine run builds a fresh engine (and frees it after), registers the adapters as
generated ones and warms up before the clock starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraserve.bench.adapters import AdapterGenerator
from loraserve.bench.hostprof import format_profile
from loraserve.bench.options import BenchConfig, config_from_cli
from loraserve.bench.physics import kv_bytes_per_token, lora_extra, throughput_at_adapter_floor
from loraserve.bench.probe import decode_probe
from loraserve.bench.runner_inproc import BenchRequest, InprocDriver, RunOptions, warm_up
from loraserve.bench.workload import (
    WorkloadConfig,
    adapter_name,
    generate_trace,
    prompt_token_ids,
)
from loraserve.config import ModelConfig, parse_dtype
from loraserve.engine.adapters import PHASES
from loraserve.engine.args import EngineArgs
from loraserve.engine.engine import LLMEngine, resolve_model_path
from loraserve.memory.pool import PageKind
from loraserve.model.loader import PRESETS

logger = logging.getLogger(__name__)

WARMUP_ADAPTER = "bench-warmup"
WARMUP_SEED = 1 << 30
SEPARATE_SHARE = 0.1  # default adapter pool of "separate": this share of the unified pool

Report = Callable[[str], None]  # gets one line per finished run


def bench_main(ns: argparse.Namespace) -> int:
    if ns.merge:
        results = merge_results([json.loads(Path(f).read_text()) for f in ns.merge.split(",")])
    else:
        config = config_from_cli(ns)
        results = run_bench(config, report=lambda line: sys.stderr.write(line + "\n"))
    text = json.dumps(results, indent=1)
    if ns.out:
        Path(ns.out).write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    sweep = results["sweep"] is not None
    plot = ns.plot or (str(Path(ns.out).with_suffix(".png")) if ns.out and sweep else None)
    if plot:
        from loraserve.bench.plot import plot_results

        plot_results(results, plot)
        sys.stderr.write(f"plot: {plot}\n")
    return 0


def run_bench(config: BenchConfig, report: Report = logger.info) -> dict[str, Any]:
    """Every point of the sweep; ``report`` gets one line per finished run."""
    model = model_config(config.engine.model)
    with tempfile.TemporaryDirectory(prefix="loraserve-bench-") as tmp, _Engines() as engines:
        files = Path(config.adapter_files or tmp)
        base_runs: dict[tuple, dict[str, Any]] = {}  # one base run per distinct trace
        points = [
            _run_point(config, w, model, files, report, base_runs, engines)
            for w in config.workloads()
        ]
        if "peft" in config.baselines and not config.url:
            # After every engine run: one engine start-up serves the whole sweep, and the
            # HF model gets the device memory to itself.
            engines.close()
            for workload, point in zip(config.workloads(), points, strict=True):
                if config.peft.max_n is None or workload.num_adapters <= config.peft.max_n:
                    _add_peft_run(config, workload, model, point, report)
    return {
        "config": config.as_dict(),
        "environment": _environment(),
        "sweep": config.sweep,
        "points": points,
    }


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several runs of the same bench at different n or rates (each
    command of a GPU session must stay short): their points, ordered."""
    points = sorted((p for r in parts for p in r["points"]), key=lambda p: (p["n"], p["rate"]))
    varies = [axis for axis in ("n", "rate") if len({p[axis] for p in points}) > 1]
    if len(varies) > 1:
        raise ValueError("the results to merge differ in both n and rate: merge one sweep")
    return {**parts[0], "sweep": varies[0] if varies else None, "points": points}


def model_config(model: str | None) -> ModelConfig:
    if model in PRESETS:
        return PRESETS[model]
    return ModelConfig.from_dir(resolve_model_path(model))


def bench_requests(
    workload: WorkloadConfig, vocab_size: int, max_requests: int | None
) -> list[BenchRequest]:
    """The trace as requests: token-id prompts, adapter names."""
    trace = generate_trace(workload)[:max_requests]
    return [
        BenchRequest(t, prompt_token_ids(t, vocab_size, workload.seed), adapter_name(t.adapter))
        for t in trace
    ]


def _run_point(
    config: BenchConfig,
    workload: WorkloadConfig,
    model: ModelConfig,
    files: Path,
    report: Report,
    base_runs: dict[tuple, dict[str, Any]],
    engines: _Engines,
) -> dict[str, Any]:
    """One trace through loraserve and each baseline. ``base_runs``: base-model results by
    trace; S-LoRA's generator draws arrivals and lengths independently of n, so the points
    of an n sweep share one trace and one base run ("reused_from_n" marks the copies)."""
    requests = bench_requests(workload, model.vocab_size, config.max_requests)
    base = [r._replace(adapter=None) for r in requests]
    where = _where(config, model, workload)
    runs: dict[str, dict[str, Any]] = {}

    def done(label: str, result: dict[str, Any]) -> None:
        runs[label] = result
        report(format_run(f"{where} {label}", result))

    if config.url:
        done("loraserve", _http_run(config, requests, "loraserve", model, files))
        if "base" in config.baselines:
            done("base", _http_run(config, base, "base", model, files))
    else:

        def drive(args: EngineArgs, reqs: list[BenchRequest], label: str) -> dict[str, Any]:
            engine = engines.get(args)
            result = _drive_engine(config, engine, workload, reqs, label)
            return {**result, "engine_start_s": engines.start_s}

        done("loraserve", drive(config.engine, requests, "loraserve"))
        for name, args in config.variants:
            label = f"loraserve:{name}"
            done(label, drive(args, requests, label))
        trace = tuple((r.trace.arrival, r.trace.input_len, r.trace.output_len) for r in base)
        for name, args in _engine_baselines(config, runs["loraserve"]["engine"]).items():
            if name == "base" and trace in base_runs:
                done(name, base_runs[trace])
                continue
            done(name, drive(args, base if name == "base" else requests, name))
            if name == "base":
                base_runs[trace] = {**runs[name], "reused_from_n": workload.num_adapters}
    if "peft" in config.baselines and config.url:
        done("peft", _peft_run(config, requests, model))
    _add_lora_extra(runs, where, report)
    return {
        "n": workload.num_adapters,
        "rate": workload.rate,
        "num_requests": len(requests),
        "runs": runs,
        "loraserve_over": _ratios(runs),
    }


def _where(config: BenchConfig, model: ModelConfig, workload: WorkloadConfig) -> str:
    return f"{config.setting or model.name} n={workload.num_adapters} rate={workload.rate:g}"


def _add_peft_run(
    config: BenchConfig,
    workload: WorkloadConfig,
    model: ModelConfig,
    point: dict[str, Any],
    report: Report,
) -> None:
    """The PEFT baseline of one point, on the point's trace, after the engine runs."""
    requests = bench_requests(workload, model.vocab_size, config.max_requests)
    point["runs"]["peft"] = _peft_run(config, requests, model)
    point["loraserve_over"] = _ratios(point["runs"])
    where = _where(config, model, workload)
    report(format_run(f"{where} peft", point["runs"]["peft"]))


def _add_lora_extra(runs: dict[str, dict[str, Any]], where: str, report: Report) -> None:
    """Each loraserve run's decode step time over base's, against its adapter bytes."""
    base = (runs.get("base") or {}).get("decode") or {}
    base_req_s = (runs.get("base") or {}).get("throughput_req_s")
    for label, run in runs.items():
        if not label.startswith("loraserve"):
            continue
        extra = lora_extra(run.get("decode") or {}, base)
        if extra is None:
            continue
        at_floor = throughput_at_adapter_floor(run, extra)
        if at_floor is not None:
            extra["req_s_at_adapter_floor"] = at_floor
            if base_req_s:
                extra["req_s_at_adapter_floor_over_base"] = at_floor / base_req_s
        run["lora_extra"] = extra
        report(
            f"{where} {label}: LoRA adds {extra['extra_ms']:.2f} ms to a decode step (against "
            f"base's bytes/ms: {extra['modelled_without_lora_ms']:.2f} ms without adapters); "
            f"its distinct adapters' bytes need {extra['adapter_floor_ms']:.2f} ms; ratio "
            f"{extra['extra_over_adapter_floor']:.2f}; decode step time without / with LoRA "
            f"at this batch {extra['decode_ratio']:.3f}, at LoRA's byte floor "
            f"{extra['decode_ratio_at_adapter_floor']:.3f}"
        )
        if "req_s_at_adapter_floor_over_base" in extra:
            report(
                f"{where} {label}: with LoRA at its byte floor this run would do "
                f"{extra['req_s_at_adapter_floor']:.2f} req/s, "
                f"{extra['req_s_at_adapter_floor_over_base']:.3f} of base's"
            )


def _ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """loraserve's throughput over each baseline's (base: the cost of LoRA; peft: the
    speed-up S-LoRA reports), in requests/s and, as "NAME_tok_s", in output tokens/s (a
    baseline that finished no request within its time limit still has a token rate)."""
    ours = runs["loraserve"]["throughput_req_s"]
    ours_tok = runs["loraserve"]["output_tok_s"]
    ratios: dict[str, float | None] = {}
    for name, run in runs.items():
        if not name.startswith("loraserve"):
            ratios[name] = ours / run["throughput_req_s"] if run["throughput_req_s"] else None
            tok = run.get("output_tok_s")
            ratios[f"{name}_tok_s"] = ours_tok / tok if tok else None
    base = runs.get("base", {}).get("throughput_req_s")
    for name, run in runs.items():  # variants: against the default and against base
        if name.startswith("loraserve:"):
            ratios[f"{name}/loraserve"] = run["throughput_req_s"] / ours if ours else None
            if base:
                ratios[f"{name}/base"] = run["throughput_req_s"] / base
    return ratios


def _engine_baselines(config: BenchConfig, unified: dict[str, Any]) -> dict[str, EngineArgs]:
    """The engine arguments of each asked-for engine baseline. ``unified``: the engine info
    of loraserve's own run. Every baseline gets its page pool (the same pages; "separate"
    splits the same total), whatever memory the device has free by then."""
    same = config.engine
    if same.num_pages is None and same.pool_bytes is None:
        same = dataclasses.replace(same, num_pages=unified["pool_pages"])
    variants = {
        "base": same,
        "padded": dataclasses.replace(same, lora_backend="bmm"),
        "separate": _separate_args(config, same, unified),
    }
    return {name: args for name, args in variants.items() if name in config.baselines}


def _separate_args(config: BenchConfig, same: EngineArgs, unified: dict[str, Any]) -> EngineArgs:
    nbytes = config.separate_adapter_bytes or int(SEPARATE_SHARE * unified["pool_bytes"])
    args = dataclasses.replace(same, adapter_pool_bytes=nbytes)
    if args.num_pages is not None:  # a page count is not a budget: take the pages off it
        args = dataclasses.replace(args, num_pages=args.num_pages - nbytes // unified["page_bytes"])
    return args


class _Engines:
    """One engine at a time, reused by the runs that follow with the same arguments: on a
    GPU, start-up (precompiling kernels, capturing the decode graphs) costs as much as a
    short run. A reused engine starts each run as a fresh one would: no adapter registered,
    none in its pool, every page free (the base baseline is this same engine with no
    adapters)."""

    def __init__(self) -> None:
        self.args: EngineArgs | None = None
        self.engine: LLMEngine | None = None
        self.created = 0
        # seconds the latest get() spent creating its engine (kernels compiled, graphs
        # captured); None: it reused the engine before
        self.start_s: float | None = None

    def __enter__(self) -> _Engines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, args: EngineArgs) -> LLMEngine:
        if self.engine is not None and self._same(args):
            _reset(self.engine)
            self.start_s = None
            return self.engine
        self.close()
        start = time.perf_counter()
        self.engine, self.args = args.create_engine(), args
        self.start_s = time.perf_counter() - start
        self.created += 1
        return self.engine

    def _same(self, args: EngineArgs) -> bool:
        """The same arguments, or ones that only pin the page count this engine has."""
        assert self.args is not None and self.engine is not None
        pages = self.engine.pool.num_pages
        return args == self.args or (
            args.num_pages == pages
            and dataclasses.replace(args, num_pages=self.args.num_pages) == self.args
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = self.args = None
            _free_device_memory()


def _reset(engine: LLMEngine) -> None:
    """Forget every adapter (their pool pages and host copies go with them)."""
    assert not engine.has_unfinished()
    engine.drain()
    for name in engine.adapter_store.names():
        engine.remove_adapter(name)
    engine.check_integrity()
    assert engine.adapter_cache.pool.num_used(PageKind.ADAPTER) == 0


def _drive_engine(
    config: BenchConfig,
    engine: LLMEngine,
    workload: WorkloadConfig,
    requests: list[BenchRequest],
    label: str,
) -> dict[str, Any]:
    generator = AdapterGenerator(
        engine.config.model,
        engine.config.dtype,
        max(config.ranks),
        config.targets,
        config.adapter_source,
    )
    uses_adapters = any(r.adapter is not None for r in requests)
    if uses_adapters:
        generator.register_many(engine, workload.num_adapters, config.ranks)
    if config.warmup:
        _warm_up(engine, generator if uses_adapters else None, max(config.ranks))
    limit = config.padded_time_limit if label == "padded" else None
    options = RunOptions(
        label, limit or config.time_limit, config.slo_s, config.progress, config.host_profile
    )
    run = InprocDriver(engine, requests, options).run()
    engine.check_integrity()
    result = {**run.result(config.slo_s), "engine": _engine_info(engine)}
    if uses_adapters and config.decode_probe and label.startswith("loraserve"):
        result["decode_probe"] = _probe(engine, requests, result["decode"])
        engine.check_integrity()
    return result


def _probe(
    engine: LLMEngine, requests: list[BenchRequest], decode: dict[str, Any]
) -> dict[str, Any]:
    """The run's average decode step (rows, context per row, distinct adapters from the
    trace) timed with and without LoRA on this engine (bench/probe.py)."""
    if not decode.get("decode_steps"):
        return {"skipped": "no decode steps in the run"}
    batch = round(decode["avg_batch"])
    kv_token = kv_bytes_per_token(engine.config.model, engine.config.dtype)
    context = round(decode["avg_kv_bytes"] / kv_token / decode["avg_batch"])
    distinct = max(1, round(decode["avg_distinct_adapters"]))
    adapters = list(dict.fromkeys(r.adapter for r in requests if r.adapter is not None))
    try:
        return decode_probe(engine, adapters[:distinct], batch, context)
    except Exception as e:  # noqa: BLE001 - a measurement after the run: never lose the run
        logger.exception("decode probe failed")
        return {"skipped": f"failed: {type(e).__name__}: {e}"}


def _warm_up(engine: LLMEngine, generator: AdapterGenerator | None, rank: int) -> None:
    """Run every path (base, and LoRA with an adapter of the largest rank that the trace
    never uses) before the clock starts; the warm-up adapter is dropped again. Staging
    buffers the size of that adapter are made for every load that can be in flight at once
    (I/O threads + prefetch depth): pinning them during the run cost S2 at n = 2000 1.6 s
    of host time in its first seconds (GPU session 14), a one-time start-up cost like the
    graphs' capture."""
    warm_up(engine, None)
    if generator is None:
        return
    generator.register(engine, WARMUP_ADAPTER, rank, seed=WARMUP_SEED)
    warm_up(engine, WARMUP_ADAPTER)
    engine.remove_adapter(WARMUP_ADAPTER)
    in_flight = max(1, engine.adapters.threads) + engine.config.lora.prefetch
    engine.adapter_cache.reserve_staging(in_flight)


def _engine_info(engine: LLMEngine) -> dict[str, Any]:
    separate = engine.adapter_cache.pool is not engine.pool
    page = engine.pool.page_bytes
    return {
        "pool_pages": engine.pool.num_pages,
        "page_bytes": page,
        "pool_bytes": engine.pool.num_pages * page,
        "adapter_pool_bytes": engine.adapter_cache.pool.num_pages * page if separate else None,
        "lora_backend": engine.config.lora_backend,
        "device": str(engine.device),
        "dtype": str(engine.config.dtype).removeprefix("torch."),
        "max_num_seqs": engine.config.scheduler.max_num_seqs,
        "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens,
        "max_loras": engine.config.lora.max_loras,
        "max_lora_rank": engine.config.lora.max_lora_rank,
        "adapter_io_threads": engine.adapters.threads,
    }


def _http_run(
    config: BenchConfig, requests: list[BenchRequest], label: str, model: ModelConfig, files: Path
) -> dict[str, Any]:
    from loraserve.bench.runner_http import HttpTarget, load_adapters, run_http

    target = HttpTarget(config.url, config.api_key)
    names = sorted({r.adapter for r in requests if r.adapter is not None})
    if names and config.url_adapters == "load":
        load_adapters(target, names, model, config.ranks, config.targets, files)
    options = RunOptions(label, config.time_limit, config.slo_s, config.progress)
    return run_http(target, requests, options).result(config.slo_s)


def _peft_run(
    config: BenchConfig, requests: list[BenchRequest], model: ModelConfig
) -> dict[str, Any]:
    result = _drive_peft(config, requests, model)
    _free_device_memory()
    return result


def _drive_peft(
    config: BenchConfig, requests: list[BenchRequest], model: ModelConfig
) -> dict[str, Any]:
    from loraserve.bench.baselines import PeftBaseline, build_hf_model

    device, dtype = _device_dtype(config.engine)
    hf = build_hf_model(config.engine.model, model, device, dtype)
    run = PeftBaseline(hf, config.ranks, config.targets, config.peft).run(requests)
    engine = {"device": device, "dtype": str(dtype).removeprefix("torch.")}
    return {**run.result(config.slo_s), "engine": engine}


def _device_dtype(args: EngineArgs) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, parse_dtype(args.dtype)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        logger.info("device memory free after a run: %.1f of %.1f GiB", free / 2**30, total / 2**30)


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def format_run(where: str, r: dict[str, Any]) -> str:
    """One line: throughput, latencies, SLO, adapter loads and the decode-step physics."""
    line = (
        f"{where}: {r['throughput_req_s']:.2f} req/s, {r['output_tok_s']:.0f} out tok/s, "
        f"completed {r['completed']}/{r['issued']}, latency {_s(r['avg_latency_s'])}, "
        f"first token avg {_s(r['avg_first_token_s'])} p99 {_s(r['p99_first_token_s'])}, "
        f"SLO({r['slo_s']:g} s) {_pct(r['slo_attainment'])}"
    )
    queue = r.get("queue") or {}
    if queue.get("started"):
        line += f", in queue avg {_s(queue['avg_s'])} p99 {_s(queue['p99_s'])}"
    steps = r.get("steps")
    if steps:
        parts = [
            f"{k} {v['steps']} x {v['avg_ms']:.1f} ms"
            for k, v in steps.items()
            if isinstance(v, dict) and v["steps"]
        ]
        line += f"\n    steps: {', '.join(parts)}; outside steps {steps['outside_steps_s']:.1f} s"
    if r.get("engine_start_s") is not None:
        line += f"; engine started in {r['engine_start_s']:.1f} s"
    compiles = r.get("triton_compiles")
    if compiles:
        line += f", Triton compiles during the run {sum(compiles.values())}"
    alloc = r.get("cuda_allocator")
    if alloc:
        line += (
            f", CUDA allocator during the run: {alloc['num_alloc_retries']} retries, "
            f"{alloc['num_device_alloc']} cudaMalloc, {alloc['num_device_free']} cudaFree"
        )
    passes = r.get("forward_passes")
    if passes:
        line += (
            f", forward passes: decode graph {passes['decode_graph']} "
            f"({passes.get('decode_graph_grouped', 0)} grouped, "
            f"{passes.get('decode_graph_small_rank', 0)} small-rank), prefill graph "
            f"{passes['prefill_graph']} ({passes.get('prefill_graph_small_rank', 0)} "
            f"small-rank), eager {passes['eager']}; steps with prompt rows "
            f"{passes.get('prompt_steps', '-')}"
        )
    loads = r.get("adapter_loads") or {}
    if "gpu_loads" in loads:
        line += f", adapter loads gpu {loads['gpu_loads']} host {loads['host_loads']}"
        if loads.get("io_thread_s") is not None:
            line += (
                f" (I/O threads busy {loads['io_thread_s']:.1f} s; "
                f"{loads['staging_allocations']} staging buffers made in "
                f"{loads['staging_alloc_s']:.2f} s)"
            )
        times = loads.get("load_times") or {}
        if times.get("loads"):
            line += (
                f"\n    adapter loads asked -> ready: avg {times['avg_ms']:.1f} ms, p50 "
                f"{times['p50_ms']:.1f}, p99 {times['p99_ms']:.1f}, max {times['max_ms']:.1f} "
                "(avg ms: " + ", ".join(f"{p} {times[f'{p}_avg_ms']:.1f}" for p in PHASES) + ")"
            )
            if loads.get("load_no_room") is not None:
                line += f"; {loads['load_no_room']} tries found no room in the pool"
            if loads.get("loads_in_wait") is not None:
                line += (
                    f"; {loads['loads_in_wait']} loaded by their I/O thread while the engine "
                    "waited for the device"
                )
    admission = r.get("admission") or {}
    if admission.get("admissions"):
        line += (
            f"\n    admission: {admission['admissions']} passes started {admission['started']}"
            f" requests ({admission['started_per_admission']:.2f} each); "
            f"{admission['adapter_waits']} passes left a request waiting for its adapter with "
            "a sequence slot free"
        )
        if admission["adapter_waits"]:
            stages = ("idle", "reading", "packed", "copying", "ready")
            line += (
                " (the adapter "
                + ", ".join(f"{stage} {admission.get(f'wait_{stage}', 0)}" for stage in stages)
                + ")"
            )
    launches = r.get("launches") or {}
    if launches:
        prefix = "not_ahead_"
        reasons = {k[len(prefix) :]: v for k, v in launches.items() if k.startswith(prefix)}
        line += (
            f"\n    launches: {launches['ahead']} steps queued behind the previous one "
            f"({launches.get('ahead_while_loading', 0)} with prompts waiting for adapters "
            f"still loading), {sum(reasons.values())} launched after its results came back "
            "(why: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in reasons.items()) + ")"
        )
    decode = r.get("decode") or {}
    if decode.get("decode_steps"):
        line += (
            f"\n    decode step (H200 byte floor model): measured {decode['measured_ms']:.2f} ms"
            f" at batch {decode['avg_batch']:.1f} of {decode.get('avg_distinct_adapters', 0):.1f}"
            " distinct adapters; floor (weights + KV + distinct adapters)"
            f" / 4.26 TB/s = {decode['floor_ms']:.2f} ms; ratio {decode['measured_over_floor']:.2f}"
        )
    for k, v in (steps or {}).items():  # wait ~ 0: the host set the pace, not the device
        phases = v.get("phases_avg_ms") if isinstance(v, dict) else None
        if phases and k != "empty":
            split = ", ".join(f"{p} {ms:.2f}" for p, ms in phases.items())
            share = 100 * v["host_bound_share"]
            line += f"\n    {k} step phases (ms): {split}; {share:.0f}% waited < 1 ms"
            if v.get("device_busy_avg_ms") is not None:
                line += (
                    f"; device on the step collected {v['device_busy_avg_ms']:.2f}, idle "
                    f"before it {v['device_idle_avg_ms']:.2f} (> 1 ms before "
                    f"{v.get('device_idle_over_1ms', 0)} steps)"
                )
    pauses = r.get("gc")
    if pauses:
        gens = "/".join(str(c) for c in pauses["collections"])
        line += (
            f"\n    garbage collections (gen 0/1/2) {gens}: {pauses['seconds']:.2f} s, longest "
            f"{pauses['longest_ms']:.1f} ms"
        )
    probe = r.get("decode_probe")
    if probe:
        line += "\n    " + format_probe(probe)
    if r.get("host_profile"):
        line += "\n" + format_profile(r["host_profile"])
    return line


def format_probe(p: dict[str, Any]) -> str:
    if "skipped" in p:
        return f"decode probe skipped: {p['skipped']}"
    ratio = p["extra_over_adapter_floor"]
    return (
        f"decode probe (this engine, batch {p['batch']}, context {p['context']}, "
        f"{p['distinct_adapters']} distinct adapters): {p['with_lora_ms']:.2f} ms with LoRA, "
        f"{p['without_lora_ms']:.2f} ms without; LoRA adds {p['extra_ms']:.2f} ms, its "
        f"adapters' bytes need {p['adapter_floor_ms']:.2f} ms (ratio "
        f"{'-' if ratio is None else f'{ratio:.2f}'}); step time without / with LoRA "
        f"{p['decode_ratio']:.3f}, at LoRA's byte floor {p['decode_ratio_at_adapter_floor']:.3f}"
    )


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
