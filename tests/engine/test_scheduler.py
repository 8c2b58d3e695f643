"""Continuous batching under pressure: preemption, chunked prefill, aborts; no page leaks."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from loraserve.engine.args import EngineArgs
from loraserve.request import SamplingParams


def run_all(engine, prompts, params, check_every_step=False):
    ids = [engine.add_request(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
    results = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id] = out
        steps += 1
        if check_every_step:
            engine.check_integrity()
        assert steps < 10_000, "engine does not make progress"
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_pages, "pages leaked"
    return [results[i] for i in ids]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory(num_attention_heads=4, num_key_value_heads=2)


def make_engine(model_dir, **kw):
    return EngineArgs(model=str(model_dir), dtype="float32", device="cpu", **kw).create_engine()


def prompts(n, seed=0, lo=4, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def test_small_pool_preempts_and_gives_same_tokens(model_dir):
    ps = prompts(6)
    big = run_all(make_engine(model_dir), ps, GREEDY)
    # Each request needs at most 4 pages of 16 tokens; 6 of them cannot run at once in 9.
    small_engine = make_engine(model_dir, num_pages=9, block_size=16)
    small = run_all(small_engine, ps, GREEDY, check_every_step=True)
    assert sum(o.num_preemptions for o in small) > 0, "the preemption path did not run"
    for a, b in zip(big, small, strict=True):
        assert a.token_ids == b.token_ids
        assert b.finish_reason == "length"


def test_chunked_prefill_gives_same_tokens(model_dir):
    ps = prompts(4, seed=1, lo=30, hi=60)
    full = run_all(make_engine(model_dir), ps, GREEDY)
    chunked = run_all(make_engine(model_dir, max_num_batched_tokens=7), ps, GREEDY)
    for a, b in zip(full, chunked, strict=True):
        assert a.token_ids == b.token_ids


def test_max_num_seqs_bounds_the_running_set(model_dir):
    engine = make_engine(model_dir, max_num_seqs=2)
    for i, p in enumerate(prompts(5, seed=2)):
        engine.add_request(p, GREEDY, request_id=str(i))
    finished = 0
    while engine.has_unfinished():
        assert len(engine.scheduler.running) <= 2
        finished += sum(o.finished for o in engine.step())
    assert finished == 5


def test_random_workload_with_aborts_keeps_pool_consistent(model_dir):
    rng = random.Random(3)
    engine = make_engine(model_dir, num_pages=12, max_num_batched_tokens=48)
    live: set[str] = set()
    next_id = 0
    for _ in range(150):
        if rng.random() < 0.3:
            p = prompts(1, seed=rng.randrange(10**6))[0]
            params = SamplingParams(
                max_tokens=rng.randrange(1, 30), temperature=0.0, ignore_eos=True
            )
            live.add(engine.add_request(p, params, request_id=str(next_id)))
            next_id += 1
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            engine.abort(victim)
            live.discard(victim)
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        engine.check_integrity()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        engine.check_integrity()
    assert not live
    assert engine.pool.num_free == engine.pool.num_pages


def test_request_larger_than_pool_is_rejected_alone(model_dir):
    engine = make_engine(model_dir, num_pages=3, block_size=16)
    with pytest.raises(ValueError, match="pages"):
        engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=30))
    # The engine still serves a request that fits.
    out = run_all(engine, [[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].token_ids) == 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_prefill_batch_window_groups_arrivals_into_one_prefill_step(model_dir):
    engine = make_engine(model_dir, prefill_batch_window=0.05)
    clock = FakeClock()
    engine.scheduler.clock = clock
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    first = engine.add_request([5, 6, 7, 8], params, request_id="first")
    engine.step()  # nothing runs: admitted at once
    assert [r.request_id for r in engine.scheduler.running] == [first]
    late = []
    for i in range(3):
        req = engine.add_request([9, 10 + i, 11], params, request_id=f"late{i}")
        engine.scheduler.waiting[-1].arrival_time = clock.now
        late.append(req)
        engine.step()  # pure decode steps: the new prompts wait
        assert len(engine.scheduler.running) == 1 and len(engine.scheduler.waiting) == i + 1
        clock.now += 0.01
    clock.now += 0.03  # the oldest has now waited 0.05 s
    scheduled = engine.scheduler.schedule()
    assert [r.request_id for r in scheduled.requests] == [first, *late]
    assert scheduled.num_scheduled == [1, 3, 3, 3]


def test_prefill_batch_window_keeps_tokens_and_defaults(model_dir):
    ps = prompts(5, seed=3)
    eager = run_all(make_engine(model_dir), ps, GREEDY)
    held = make_engine(model_dir, prefill_batch_window=10.0)  # waits only while others decode
    outs = []
    ids = []
    for i, p in enumerate(ps):  # arrivals between steps: held until nothing else runs
        ids.append(held.add_request(p, GREEDY, request_id=str(i)))
        for out in held.step():
            outs.append(out)
    while held.has_unfinished():
        outs.extend(held.step())
    final = {o.request_id: o for o in outs if o.finished}
    assert [final[i].token_ids for i in ids] == [o.token_ids for o in eager]
    assert make_engine(model_dir).config.scheduler.prefill_batch_window == 0.0  # CPU: no graphs
    graphed = make_engine(model_dir, cuda_graph_max_batch=4)
    assert graphed.config.scheduler.prefill_batch_window == 0.05
    with pytest.raises(ValueError, match="prefill_batch_window"):
        make_engine(model_dir, prefill_batch_window=-1.0)


def test_ttft_deadline_fails_requests_that_waited_too_long(model_dir):
    engine = make_engine(model_dir, max_num_seqs=1, ttft_deadline=0.5)
    clock = FakeClock()
    engine.scheduler.clock = clock
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="runs")
    engine.add_request([8, 9, 10], params, request_id="waits")
    for request in engine.scheduler.waiting:
        request.arrival_time = clock.now
    outs = engine.step()  # "runs" starts; "waits" has no room (max_num_seqs=1)
    assert [o.request_id for o in outs] == ["runs"]
    clock.now += 0.4
    assert all(o.request_id == "runs" for o in engine.step())  # still inside the deadline
    clock.now += 0.2
    outs = {o.request_id: o for o in engine.step()}
    failed = outs["waits"]
    assert failed.finished and failed.finish_reason == "error"
    assert failed.error_type == "deadline" and "first-token deadline of 0.5 s" in failed.error
    assert not outs["runs"].finished  # the running request is never expired
    while engine.has_unfinished():
        engine.step()
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_pages


def test_ttft_deadline_spares_preempted_requests(model_dir):
    # A preempted request already had its first token: it waits again without a deadline.
    engine = make_engine(model_dir, num_pages=4, block_size=16, ttft_deadline=0.5)
    clock = FakeClock()
    engine.scheduler.clock = clock
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(list(range(3, 20)), params, request_id=str(i))
        # on the fake clock (time.monotonic() is below its 1000 s on a machine up < 1000 s)
        engine.scheduler.waiting[-1].arrival_time = clock.now
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
        clock.now += 0.01
    final = {o.request_id: o for o in outs if o.finished}
    preempted = [o for o in final.values() if o.num_preemptions]
    assert preempted, "the preemption path did not run"
    assert all(o.finish_reason == "length" for o in preempted)
    with pytest.raises(ValueError, match="ttft_deadline"):
        make_engine(model_dir, ttft_deadline=0.0)


def test_time_in_queue_is_arrival_to_first_step(model_dir):
    engine = make_engine(model_dir, max_num_seqs=1)
    clock = FakeClock()
    engine.scheduler.clock = clock
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for rid in ("a", "b"):
        engine.add_request([5, 6, 7], params, request_id=rid)
    for request in engine.scheduler.waiting:
        request.arrival_time = clock.now
    seen: dict[str, list] = {"a": [], "b": []}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out.time_in_queue)
        clock.now += 0.25
    assert set(seen["a"]) == {0.0}  # started at once
    assert set(seen["b"]) == {0.75}  # "a" took the only seat for 3 steps


def test_admission_interval_holds_prompts_while_the_batch_is_nearly_full(model_dir):
    engine = make_engine(model_dir, max_num_seqs=16, admission_interval=1.0)
    clock = FakeClock()
    engine.scheduler.clock = clock
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for i in range(15):
        engine.add_request([5, 6, 7 + i], params, request_id=f"r{i}")
    engine.step()  # an idle engine admits at once
    assert len(engine.scheduler.running) == 15
    engine.add_request([9, 9, 9], params, request_id="late")
    for _ in range(3):  # one free slot (< 16 / 8): held, the steps stay pure decode
        clock.now += 0.2
        engine.step()
        assert [r.request_id for r in engine.scheduler.waiting] == ["late"]
        assert len(engine.scheduler.running) == 15
    clock.now += 0.5  # a second since the last admission
    scheduled = engine.scheduler.schedule()
    assert scheduled.requests[-1].request_id == "late" and scheduled.num_scheduled[-1] == 3
    # Two free slots (16 / 8) admit at once, interval or not.
    roomy = make_engine(model_dir, max_num_seqs=16, admission_interval=100.0)
    roomy.scheduler.clock = clock
    for i in range(14):
        roomy.add_request([5, 6, 7 + i], params, request_id=f"r{i}")
    roomy.step()
    roomy.add_request([9, 9, 9], params, request_id="late")
    assert roomy.scheduler.schedule().requests[-1].request_id == "late"
    with pytest.raises(ValueError, match="admission_interval"):
        make_engine(model_dir, admission_interval=-1.0)


class _ReadyCache:
    """The adapter cache as admit_ready sees it: which adapters are ready, hit counts."""

    def __init__(self, ready):
        self.ready = set(ready)
        self.stats = SimpleNamespace(gpu_hits=0, gpu_misses=0)

    def is_ready(self, name):
        return name in self.ready

    def acquire(self, name):
        return 0

    def release(self, name):
        pass


def test_admit_ready_passes_over_adapters_not_ready_and_keeps_each_adapters_order():
    """A step queued ahead admits every ready request within the lookahead, not only those
    before the first one whose adapter is still loading (each admission is a prefill step)."""
    import torch  # noqa: PLC0415

    from loraserve.config import SchedulerConfig  # noqa: PLC0415
    from loraserve.engine.scheduler import Scheduler  # noqa: PLC0415
    from loraserve.memory.kv_cache import KVCacheManager  # noqa: PLC0415
    from loraserve.memory.pool import PagePool  # noqa: PLC0415
    from loraserve.request import Request  # noqa: PLC0415

    kv = KVCacheManager(PagePool(64, 16, torch.float32, "cpu"), 4)
    cache = _ReadyCache({"a", "c"})
    adapters = SimpleNamespace(
        cache=cache,
        is_ready=cache.is_ready,
        stage=lambda name: "ready" if cache.is_ready(name) else "reading",
    )
    sched = Scheduler(SchedulerConfig(max_num_seqs=8), kv, adapters, watermark=0, lookahead=2)
    params = SamplingParams(max_tokens=2)
    order = ["a", "b", "c", "b", None, "a", "d", "c"]
    for i, adapter in enumerate(order):
        sched.add(Request(f"r{i}", [1, 2, 3], params, adapter=adapter))
    batch = sched.admit_ready(budget=100)
    # the lookahead counts requests passed over: r1 and r3 (adapter b), so it stops at r3
    assert [r.request_id for r in batch.requests] == ["r0", "r2"]
    assert sched.stats.adapter_waits == 1 and sched.stats.wait_reading == 1
    sched.lookahead = 16
    batch = sched.admit_ready(budget=100)
    assert [r.request_id for r in batch.requests] == ["r4", "r5", "r7"]
    assert [r.request_id for r in sched.waiting] == ["r1", "r3", "r6"]
    assert sched.stats.admissions == 2 and sched.stats.started == 5
    cache.ready.add("b")  # b's requests next, in order; d still waits
    batch = sched.admit_ready(budget=100)
    assert [r.request_id for r in batch.requests] == ["r1", "r3"]
    assert cache.stats.gpu_hits == 6  # each admitted request with an adapter, once
