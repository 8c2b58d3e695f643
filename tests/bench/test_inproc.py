"""The in-process open-loop driver on the tiny model, and lazy adapter registration."""

from __future__ import annotations

import dataclasses
import gc
import threading
import time

import torch

from loraserve.bench.adapters import (
    WeightBank,
    adapter_nbytes,
    banked_lora_weights,
    register_adapters,
)
from loraserve.bench.runner_inproc import GCPauses, InprocDriver, RunOptions
from loraserve.bench.suite import bench_requests, format_run
from loraserve.bench.workload import QKVO, WorkloadConfig, adapter_name
from loraserve.request import SamplingParams

WORKLOAD = WorkloadConfig(
    num_adapters=3, rate=20, duration=1.0, input_range=(4, 16), output_range=(4, 16)
)


def test_driver_end_to_end(engine_args):
    engine = engine_args.create_engine()
    register_adapters(engine, WORKLOAD.num_adapters, (8, 4), QKVO)
    requests = bench_requests(WORKLOAD, engine.config.model.vocab_size, None)
    assert len(requests) == 20
    start = time.perf_counter()
    run = InprocDriver(engine, requests, RunOptions(progress=False)).run()
    elapsed = time.perf_counter() - start
    engine.check_integrity()
    result = run.result()
    assert result["issued"] == result["completed"] == 20 and result["not_issued"] == 0
    assert requests[-1].trace.arrival <= run.wall_time <= elapsed  # open loop: paced by arrivals
    for record, request in zip(sorted(run.records), requests, strict=True):
        assert record.arrival == request.trace.arrival
        assert record.arrival <= record.first_token <= record.finish
        assert record.output_tokens == request.trace.output_len
    assert result["slo_attainment"] == 1.0
    loads = result["adapter_loads"]
    used = {r.adapter for r in requests}
    assert loads["distinct_adapters_issued"] == loads["distinct_adapters_served"] == len(used)
    assert loads["gpu_loads"] == loads["host_loads"] == len(used)  # the pool keeps them all
    assert loads["io_thread_s"] > 0  # generating and packing them took time somewhere
    assert loads["staging_allocations"] >= 0 and loads["staging_alloc_s"] >= 0
    peak = result["pool_peak"]
    assert peak["kv_pages"] > 0 and peak["adapter_pages"] > 0
    assert peak["total_pages"] <= peak["pool_pages"] and peak["adapter_pool_pages"] is None
    decode = result["decode"]
    assert decode["decode_steps"] > 0 and decode["avg_batch"] >= 1
    assert decode["floor_ms"] > 0 and decode["measured_ms"] > 0
    assert decode["avg_adapter_bytes"] > 0 and decode["avg_kv_bytes"] > 0
    assert 1 <= decode["avg_distinct_adapters"] <= decode["avg_batch"]
    queue = result["queue"]
    assert queue["started"] == 20
    assert 0 <= queue["avg_s"] <= queue["p99_s"] <= queue["max_s"]
    steps = result["steps"]
    for kind in ("decode", "mixed"):
        k = steps[kind]
        assert k["steps"] > 0
        phases = k["phases_avg_ms"]
        assert set(phases) == {"schedule", "launch", "prefetch", "wait", "finish"}
        assert all(ms >= 0 for ms in phases.values()) and phases["launch"] > 0
        # The engine's phases are inside the driver's timing of the same steps.
        assert sum(phases.values()) <= k["avg_ms"] * (1 + 1e-6)
        assert sum(phases.values()) >= 0.2 * k["avg_ms"]
        assert 0 <= k["host_bound_share"] <= 1  # (on the CPU every step computes on the host)
    admission = result["admission"]  # every request started once (no preemption here)
    assert admission["started"] == 20 and 1 <= admission["admissions"] <= 20
    assert admission["started_per_admission"] == 20 / admission["admissions"]
    assert admission["adapter_waits"] >= 0
    passes = result["forward_passes"]  # no graphs on the CPU: every pass eager, one a step
    assert passes["decode_graph"] == passes["prefill_graph"] == 0
    assert passes["decode_graph_grouped"] == passes["decode_graph_small_rank"] == 0
    assert passes["prefill_graph_small_rank"] == 0
    assert passes["eager"] == sum(steps[k]["steps"] for k in ("decode", "mixed", "changed"))
    # a step with prompt rows is one where a request got its first token
    assert steps["mixed"]["steps"] == passes["prompt_steps"]
    launches = result["launches"]  # no graphs: no step queued ahead, each says so
    assert launches["ahead"] == launches["ahead_while_loading"] == 0
    assert launches["not_ahead_no_graph"] > 0
    assert launches["not_ahead_no_graph"] == sum(
        v for k, v in launches.items() if k.startswith("not_ahead_")
    )
    times = result["adapter_loads"]["load_times"]
    assert times["loads"] == result["adapter_loads"]["gpu_loads"] > 0
    assert times["avg_ms"] >= times["reading_avg_ms"] >= 0
    text = format_run("tiny", result)
    assert "launches: 0 steps queued" in text and "adapter loads asked -> ready" in text
    no_room = result["adapter_loads"]["load_no_room"]
    assert no_room >= 0 and f"; {no_room} tries found no room in the pool" in text
    # every admission's prompts prefill whole in the step that admits them (no chunks)
    assert passes["prompt_steps"] == admission["admissions"]
    alloc = result["cuda_allocator"]  # torch's caching allocator events during the run
    if engine.device.type == "cuda":
        assert set(alloc) == {
            "num_alloc_retries",
            "num_ooms",
            "num_device_alloc",
            "num_device_free",
        }
        assert all(v >= 0 for v in alloc.values())
    else:
        assert alloc is None
    first_token_waits = [r.first_token - r.arrival for r in run.records]
    assert queue["max_s"] <= max(first_token_waits)  # the queue is part of the first token
    pauses = result["gc"]  # the run's garbage collections, with the engine frozen out
    assert len(pauses["collections"]) == 3 and pauses["seconds"] >= 0
    assert "garbage collections (gen 0/1/2)" in text
    assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] < 20_000  # restored
    for kind in ("decode", "mixed"):  # device time: CUDA only
        assert (steps[kind]["device_busy_avg_ms"] is None) == (engine.device.type != "cuda")


def test_gc_pauses_count_collections_by_generation():
    with GCPauses() as pauses:
        gc.collect(2)
        gc.collect(0)
    gc.collect(1)  # after: not counted
    d = pauses.as_dict()
    assert d["collections"] == [1, 0, 1]
    assert d["seconds"] > 0 and d["longest_ms"] >= 1e3 * d["seconds"] / 2


def test_time_limit_cuts_the_run(engine_args):
    engine = engine_args.create_engine()
    register_adapters(engine, 2, (4,), QKVO)
    long = WorkloadConfig(2, rate=40, duration=3.0, input_range=(4, 8), output_range=(150, 160))
    requests = bench_requests(long, engine.config.model.vocab_size, None)
    run = InprocDriver(engine, requests, RunOptions(time_limit=0.4, progress=False)).run()
    result = run.result()
    # cut near 0.4 s (the step in flight finishes first; a loaded CI machine may take a
    # while): uncut, 120 requests of 150+ tokens arriving over 3 s run far longer
    assert 0.3 <= run.wall_time < 2.5
    assert result["not_issued"] > 0 and result["issued"] + result["not_issued"] == len(requests)
    assert result["unfinished"] > 0
    assert result["slo_attainment"] == result["completed"] / result["issued"]
    assert not engine.has_unfinished()  # the cut-off requests were aborted
    engine.check_integrity()


def test_ten_thousand_adapters_register_fast_and_lazily(engine_args):
    engine = engine_args.create_engine()
    start = time.perf_counter()
    names = register_adapters(engine, 10_000, (16, 8, 4, 2), ("q_proj", "down_proj"))
    assert time.perf_counter() - start < 3.0
    assert len(names) == 10_000 and names[-1] == "adapter-9999"
    store = engine.adapter_store
    assert store.stats.generated_loads == 0 and store.stats.host_bytes == 0
    model, dtype = engine.config.model, engine.config.dtype
    assert store.nbytes("adapter-9998") == adapter_nbytes(model, 4, ("q_proj", "down_proj"), dtype)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request([1, 2, 3], params, request_id="x", adapter="adapter-9999")
    while engine.has_unfinished():
        engine.step()
    assert store.stats.generated_loads == 1 and engine.adapter_cache.stats.gpu_loads == 1
    assert store.stats.host_bytes == store.nbytes("adapter-9999")


def test_bank_weights_are_deterministic_and_distinct(engine_args):
    model = engine_args.create_engine().config.model
    bank = WeightBank(model, 8, torch.float32)
    a = banked_lora_weights(bank, "a", model, 8, QKVO, seed=1)
    b = banked_lora_weights(bank, "b", model, 8, QKVO, seed=1)
    c = banked_lora_weights(bank, "c", model, 8, QKVO, seed=2)
    key = (1, "v_proj")
    assert a.modules[key].a.shape == (8, 48) and a.modules[key].b.shape == (24, 8)
    assert (a.modules[key].a == b.modules[key].a).all()
    assert not (a.modules[key].a == c.modules[key].a).all()
    assert a.nbytes == adapter_nbytes(model, 8, QKVO, torch.float32)


def test_admission_stats_count_passes_starts_and_adapter_waits(engine_args):
    engine = engine_args.create_engine()
    register_adapters(engine, 3, (8,), QKVO)
    a0, a1, a2 = (adapter_name(i) for i in range(3))
    ensure = engine.adapters.ensure

    def load(name):  # on the I/O threads
        deadline = time.monotonic() + 30
        while not ensure(name):
            assert time.monotonic() < deadline, f"{name} did not load"
            time.sleep(0.01)

    load(a0)
    held = {a1}  # nothing asked for it yet
    engine.adapters.ensure = lambda name, protect=(): name not in held and ensure(name, protect)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i, adapter in enumerate((a0, a1, None)):
        engine.add_request([5, 6, 7 + i], params, request_id=f"r{i}", adapter=adapter)
    stats = engine.scheduler.stats

    def counts():
        return (stats.admissions, stats.started, stats.adapter_waits)

    engine.step()  # r0 and r2 start; r1 waits for its adapter with slots free
    assert [r.request_id for r in engine.scheduler.waiting] == ["r1"]
    assert counts() == (1, 2, 1) and stats.wait_idle == 1
    engine.step()  # still not asked for: another pass that leaves it waiting
    assert counts() == (1, 2, 2) and stats.wait_idle == 2
    held.clear()
    load(a1)
    engine.step()
    assert counts() == (2, 3, 2)
    # An adapter an I/O thread is still reading: a wait at the "reading" stage
    gate = threading.Event()
    pack = engine.adapters._pack
    engine.adapters._pack = lambda name: gate.wait(30) and pack(name)
    engine.add_request([5, 6, 9], params, request_id="r3", adapter=a2)
    engine.step()
    assert engine.adapters.stage(a2) == "reading"
    assert counts() == (2, 3, 3) and stats.wait_reading == 1
    gate.set()
    while engine.has_unfinished():
        engine.step()
    assert stats.started == 4 and stats.adapter_waits == sum(
        getattr(stats, f"wait_{s}") for s in ("idle", "reading", "packed", "copying", "ready")
    )
    assert engine.adapters.stage(a2) == "ready" and engine.adapters.stage("nope") == "idle"


def test_load_times_split_a_load_into_its_phases(engine_args):
    engine = engine_args.create_engine()
    register_adapters(engine, 2, (8,), QKVO)
    get = engine.adapter_store.get

    def slow_get(name):  # on an I/O thread: a slow read
        time.sleep(0.05)
        return get(name)

    engine.adapter_store.get = slow_get
    names = [adapter_name(i) for i in range(2)]
    deadline = time.monotonic() + 30
    while not all([engine.adapters.ensure(n) for n in names]):
        assert time.monotonic() < deadline, "adapters did not load"
        time.sleep(0.005)
    for n in names:
        assert engine.adapters.ensure(n)  # ready again: not counted twice
    records = engine.adapters.load_times.records
    assert len(records) == 2
    for queued, reading, packed, copying in records:
        assert min(queued, packed, copying) >= 0 and reading >= 0.05
    times = engine.adapters.load_times.as_dict()
    assert times["loads"] == 2 and times["reading_avg_ms"] >= 50
    assert times["avg_ms"] >= times["reading_avg_ms"] and times["max_ms"] >= times["p50_ms"]
    assert engine.adapters.load_times.as_dict(since=2) == {"loads": 0}
    engine.shutdown()


def test_load_times_summary():
    from loraserve.engine.adapters import LoadTimes  # noqa: PLC0415

    records = [(0.001, 0.002, 0.003, 0.004), (0.0, 0.010, 0.0, 0.0), (0.1, 0.0, 0.0, 0.0)]
    times = LoadTimes(records).as_dict(since=1)
    assert times["loads"] == 2
    assert abs(times["avg_ms"] - 55) < 1e-9 and abs(times["max_ms"] - 100) < 1e-9
    assert abs(times["p50_ms"] - 100) < 1e-9 and abs(times["p99_ms"] - 100) < 1e-9
    assert abs(times["queued_avg_ms"] - 50) < 1e-9 and abs(times["reading_avg_ms"] - 5) < 1e-9
    assert times["packed_avg_ms"] == times["copying_avg_ms"] == 0


def test_load_times_count_a_load_seen_ready_by_admission_once_and_restart_after_eviction(
    engine_args,
):
    engine = engine_args.create_engine()
    register_adapters(engine, 1, (8,), QKVO)
    name = adapter_name(0)
    manager, cache = engine.adapters, engine.adapter_cache
    is_ready = cache.is_ready

    def load_until_copying():  # the copy to the pool "in flight" (immediate on the CPU)
        cache.is_ready = lambda n: False
        deadline = time.monotonic() + 30
        while manager.stage(name) != "copying":
            assert time.monotonic() < deadline, "the adapter did not load"
            manager.ensure(name)
            time.sleep(0.005)
        cache.is_ready = is_ready

    load_until_copying()
    assert manager.is_ready(name) and manager.ensure(name)  # as admit_ready sees it
    assert len(manager.load_times.records) == 1
    # given pages, then dropped before anyone saw it ready: the next load starts over
    cache.evict(name)
    load_until_copying()
    cache.evict(name)
    time.sleep(0.05)
    asked = time.perf_counter()
    load_until_copying()
    assert manager.is_ready(name)
    (*_, record) = manager.load_times.records
    assert len(manager.load_times.records) == 2 and sum(record) <= time.perf_counter() - asked
    engine.shutdown()


def test_step_kinds_with_steps_queued_ahead(engine_args):
    """With decode steps queued ahead (graphs, overlapped steps, admission ahead), the step
    that queues a prompt step behind it returns decode rows only: it counts as "changed",
    and "mixed" counts exactly the steps that computed prompts."""
    args = dataclasses.replace(
        engine_args,
        cuda_graph_max_batch=8,
        overlap_steps=True,
        overlap_admission=True,
        prefill_batch_window=0.0,
        admission_interval=0.0,
    )
    engine = args.create_engine()
    register_adapters(engine, WORKLOAD.num_adapters, (8, 4), QKVO)
    requests = bench_requests(WORKLOAD, engine.config.model.vocab_size, None)
    result = InprocDriver(engine, requests, RunOptions(progress=False)).run().result()
    steps, passes = result["steps"], result["forward_passes"]
    assert result["completed"] == 20
    assert steps["changed"]["steps"] > 0 and result["launches"]["ahead"] > 0
    assert steps["mixed"]["steps"] == passes["prompt_steps"]
    engine.shutdown()


def test_warm_up_makes_a_staging_buffer_for_every_load_in_flight(engine_args):
    """The bench's warm-up leaves free staging buffers, each as large as its largest-rank
    adapter, for the I/O threads plus the prefetch depth: loads during the run pin no new
    host memory."""
    from loraserve.bench.adapters import AdapterGenerator
    from loraserve.bench.suite import _warm_up

    engine = engine_args.create_engine()
    generator = AdapterGenerator(engine.config.model, engine.config.dtype, 8, QKVO)
    _warm_up(engine, generator, 8)
    staging = engine.adapter_cache._staging
    largest = staging._largest
    free = [buf for buf, _ in staging._buffers if buf.numel() >= largest]
    assert largest > 0
    assert len(free) == max(1, engine.adapters.threads) + engine.config.lora.prefetch
    made = engine.adapter_cache.staging["allocations"]
    register_adapters(engine, 3, (8,), QKVO)
    cache, store = engine.adapter_cache, engine.adapter_store
    packed = [cache.pack(store.get(adapter_name(i))) for i in range(3)]
    assert engine.adapter_cache.staging["allocations"] == made  # three in flight, none made
    for p in packed:
        engine.adapter_cache.discard(p)
