"""Overlapped decode steps (LLMEngine._launch_next): the engine queues the next graphed
decode step before it has the current one's tokens. Everything a user sees must be what the
plain step-by-step loop gives: tokens, logprobs, finish reasons, stops on tokens the engine
could not know in advance, aborts, late arrivals, and no page left behind."""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import Counter

import pytest

from loraserve.engine.args import EngineArgs
from loraserve.memory.pool import PageKind
from loraserve.request import SamplingParams


@pytest.fixture(scope="module")
def setup(graph_setup):
    return graph_setup


def make_engine(setup, overlap: bool, **kw):
    model_dir, adapters = setup
    kw.setdefault("prefill_batch_window", 0.0)
    engine = EngineArgs(
        model=str(model_dir), dtype="float32", cuda_graph_max_batch=8, overlap_steps=overlap, **kw
    ).create_engine()
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def warm_adapters(engine):
    """Both adapters resident, so that a request is admitted in the step after it arrives
    (not whenever its adapter's background load lands)."""
    warm = SamplingParams(max_tokens=1)
    for name in ("a", "b"):
        engine.add_request([5, 6], warm, request_id=f"warm-{name}", adapter=name)
    while engine.has_unfinished():
        engine.step()
    return engine


def sync_adapter_loads(engine):
    """Adapters loaded on the engine thread when first asked for (AdapterManager without
    I/O threads): under page pressure an evicted adapter comes back at once, not whenever
    a background load lands, so admission and preemption do not depend on timing."""
    engine.adapters.shutdown()
    engine.adapters._executor = None
    return engine


def count_calls(owner, name: str) -> list[int]:
    """Wrap ``owner.name``: [calls so far]."""
    calls = [0]
    real = getattr(owner, name)

    def counted(*args):
        calls[0] += 1
        return real(*args)

    setattr(owner, name, counted)
    return calls


def count_continued(engine) -> list[int]:
    """Wrap the runner's launch and launch_next: [steps launched after the engine had the
    previous step's tokens, steps queued behind one still running]."""
    calls = [0, 0]
    for k, name in enumerate(("launch", "launch_next")):
        real = getattr(engine.runner, name)

        def counted(*args, _real=real, _k=k):
            calls[_k] += 1
            return _real(*args)

        setattr(engine.runner, name, counted)
    return calls


def drive(engine, requests, events=None):
    """Add ``requests`` (prompt, params, adapter) and step to the end; ``events`` maps a
    step number to a callback run before that step (late arrivals, aborts)."""
    events = events or {}
    for i, (prompt, params, adapter) in enumerate(requests):
        engine.add_request(prompt, params, request_id=str(i), adapter=adapter)
    outs = {}
    step = 0
    while engine.has_unfinished() or step in events:
        if step in events:
            events[step](engine)
        outs.update({o.request_id: o for o in engine.step()})
        engine.check_integrity()
        step += 1
        assert step < 2000
    reserved = engine.pool.num_used(PageKind.RESERVED)
    adapter_pages = sum(len(a.pages) for a in engine.adapter_cache.resident())
    assert engine.pool.num_free == engine.pool.num_pages - reserved - adapter_pages, "pages lost"
    return outs


def assert_same(got, want):
    """Tokens, finish and stop reasons exactly; logprobs to 1e-4 (a different padded batch
    size sums in a different order)."""
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert (g.token_ids, g.finish_reason, g.stop_reason) == (
            w.token_ids,
            w.finish_reason,
            w.stop_reason,
        ), k
        for gd, wd in zip(g.logprobs or [], w.logprobs or [], strict=True):
            assert gd.keys() == wd.keys(), k
            assert all(abs(gd[t] - wd[t]) < 1e-4 for t in wd), k


def workload(stop_token: int | None = None, n: int = 6, seed: int = 0):
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randrange(3, 12))]
        params = SamplingParams(
            max_tokens=rng.randrange(4, 30),
            temperature=0.0,
            logprobs=2,
            ignore_eos=True,
            stop_token_ids=[stop_token] if stop_token is not None and i % 2 else None,
        )
        requests.append((prompt, params, [None, "a", "b"][i % 3]))
    return requests


@pytest.mark.parametrize("lora_backend", ["auto", "triton"])  # triton: the interpreter here
def test_overlap_gives_the_same_outputs_and_continues_steps(setup, lora_backend):
    plain = drive(warm_adapters(make_engine(setup, overlap=False)), workload())
    # A token some request generates mid-way: as a stop token it ends that request at a
    # step the engine had already queued the next one for.
    stop = plain["1"].token_ids[len(plain["1"].token_ids) // 2]
    plain_engine = warm_adapters(make_engine(setup, overlap=False, lora_backend=lora_backend))
    plain = drive(plain_engine, workload(stop))
    engine = warm_adapters(make_engine(setup, overlap=True, lora_backend=lora_backend))
    continued = count_continued(engine)
    overlapped = drive(engine, workload(stop))
    assert_same(overlapped, plain)
    assert any(o.finish_reason == "stop" for o in plain.values())  # the case is exercised
    # Every request arrived at once: after the first (prefill) step every step was queued
    # behind the one before it, including the decode step right after the prefill.
    launched, queued = continued
    assert launched == 1 and queued == max(len(o.token_ids) for o in plain.values()) - 1


def test_overlap_with_late_arrivals_and_aborts(setup):
    base = workload(n=5, seed=1)
    late = workload(n=3, seed=2)

    def arrive(engine):
        for j, (prompt, params, adapter) in enumerate(late):
            engine.add_request(prompt, params, request_id=f"late{j}", adapter=adapter)

    def abort(engine):
        engine.abort("0")

    results = []
    for overlap in (False, True):
        engine = make_engine(setup, overlap=overlap)
        continued = count_continued(engine)
        outs = drive(engine, base, events={4: abort, 6: arrive})
        results.append(outs)
        if overlap:
            assert continued[1] > 0
    plain, overlapped = results
    assert not plain["0"].finished  # an abort sends nothing more: its last output stays
    assert_same(overlapped, plain)


def test_overlap_with_a_full_batch_and_a_queue(setup):
    """More requests than sequence slots: steps continue while the batch is full, and the
    queued requests still start as slots free up."""
    requests = workload(n=10, seed=3)
    plain = drive(make_engine(setup, overlap=False, max_num_seqs=4), requests)
    engine = make_engine(setup, overlap=True, max_num_seqs=4)
    continued = count_continued(engine)
    overlapped = drive(engine, requests)
    assert_same(overlapped, plain)
    assert continued[1] > 0


def test_seeded_sampling_is_the_same_with_overlap(setup):
    def requests():
        out = []
        for i, (prompt, params, adapter) in enumerate(workload(n=4, seed=4)):
            params.temperature, params.seed, params.top_k = 0.9, 100 + i, 20
            out.append((prompt, params, adapter))
        return out

    plain = drive(make_engine(setup, overlap=False), requests())
    overlapped = drive(make_engine(setup, overlap=True), requests())
    assert_same(overlapped, plain)


def test_overlap_under_page_pressure(setup):
    """A pool too small for every request at full length: a queued step that cannot get its
    next page is not queued (the next step schedules, preempting as it must), and the
    outputs are those of the plain loop."""
    requests = workload(n=8, seed=5)
    for _, params, _ in requests:
        params.max_tokens = 40
    # Adapters loaded synchronously in both engines, so that who is admitted (and
    # preempted) when does not depend on when background loads land: a different batch mix
    # can flip a near-tie of the tiny random model (failed once in a fresh-clone CI run).
    plain_engine = sync_adapter_loads(make_engine(setup, overlap=False, num_pages=18))
    plain = drive(plain_engine, requests)
    engine = sync_adapter_loads(make_engine(setup, overlap=True, num_pages=18))
    continued = count_continued(engine)
    overlapped = drive(engine, requests)
    assert_same(overlapped, plain)
    assert continued[1] > 0
    assert sum(o.num_preemptions for o in plain.values()) > 0  # the pressure is real


def test_overlap_continues_while_the_prefill_window_holds_a_prompt(setup):
    """A prompt held by the prefill batch window does not stop the queued steps; it starts
    once the window has passed, at most one step later than without overlap."""

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    starts = {}
    outs_by_mode = []
    for overlap in (False, True):
        engine = make_engine(setup, overlap=overlap, prefill_batch_window=1.0)
        clock = engine.scheduler.clock = Clock()
        continued = count_continued(engine)
        for i in range(3):
            engine.add_request([5 + i, 6, 7], params, request_id=str(i))
        outs = {}
        step = queued_at_arrival = held = 0
        while engine.has_unfinished():
            if step == 3:
                engine.add_request([9, 9, 9], params, request_id="late")
                engine.scheduler.waiting[0].arrival_time = clock.now  # on the fake clock
            if step == 8:
                clock.now = 2.0  # the window has passed
                held = continued[1] - queued_at_arrival
            if step == 3:
                queued_at_arrival = continued[1]
            for o in engine.step():
                outs[o.request_id] = o
                if o.request_id == "late" and "late" not in starts.get(overlap, {}):
                    starts.setdefault(overlap, {})["late"] = step
            step += 1
        outs_by_mode.append(outs)
        if overlap:
            assert held == 5  # every step while "late" was held was queued ahead
    assert_same(outs_by_mode[1], outs_by_mode[0])
    assert starts[False]["late"] == 8
    assert starts[True]["late"] in (8, 9)


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_steps_with_decode_rows_in_the_graphs(setup, overlap):
    """--mixed-decode-graphs: a step that prefills runs its decode rows as a graph replay and
    its prompt rows eagerly after it; outputs are the plain loop's."""
    base = workload(n=5, seed=6)
    late = workload(n=4, seed=7)

    def arrive(engine):  # prompts joining decoding requests: mixed steps
        for j, (prompt, params, adapter) in enumerate(late):
            engine.add_request(prompt, params, request_id=f"late{j}", adapter=adapter)

    plain = drive(make_engine(setup, overlap=False), base, events={3: arrive})
    engine = warm_adapters(make_engine(setup, overlap=overlap, mixed_decode_graphs=2))
    splits = count_calls(engine.runner, "_launch_split")
    split = drive(engine, base, events={3: arrive})
    assert splits[0] >= 1
    assert_same(split, plain)
    with pytest.raises(ValueError, match="mixed_decode_graphs"):
        make_engine(setup, overlap=overlap, mixed_decode_graphs=-1)


def test_drain_drops_a_step_queued_for_requests_that_have_finished(setup):
    """Requests that stop on a token leave one queued step behind them; drain() waits for
    it, and the engine starts the next request with a plain step."""
    plain = drive(make_engine(setup, overlap=False), workload(n=2, seed=8))
    stop = plain["0"].token_ids[2]
    requests = workload(n=1, seed=8)
    requests[0][1].stop_token_ids = [stop]
    requests[0][1].max_tokens = 30
    engine = make_engine(setup, overlap=True)
    outs = drive(engine, requests)
    assert outs["0"].finish_reason == "stop"
    assert engine._inflight is not None  # queued before the stop token was seen
    engine.drain()
    assert engine._inflight is None
    outs = drive(engine, requests)  # again; this time the next step() drops what is left
    assert outs["0"].finish_reason == "stop" and engine._inflight is not None
    engine.add_request([7, 8, 9], SamplingParams(max_tokens=3), request_id="next")
    assert [o.request_id for o in engine.step()] == ["next"]  # the next step(), at once


def count_admitted_ahead(engine) -> tuple[list[int], Counter]:
    """([queued steps that admitted prompts, prompts admitted so], how often each request
    was launched from its first prompt token): a prompt must be prefilled once."""
    calls, prefills = [0, 0], Counter()
    real_next, real_launch = engine.runner.launch_next, engine.runner.launch

    def first_rows(requests):
        prefills.update(r.request_id for r in requests if r.num_computed_tokens == 0)

    def launch_next(pending, requests, prompts=None):
        if prompts is not None and prompts.requests:
            calls[0] += 1
            calls[1] += len(prompts.requests)
            first_rows(prompts.requests)
            admitted.extend(prompts.requests)
        return real_next(pending, requests, prompts)

    def launch(scheduled):
        first_rows(scheduled.requests)
        return real_launch(scheduled)

    engine.runner.launch_next, engine.runner.launch = launch_next, launch
    admitted = engine.admitted_ahead = []  # for check_computed
    return calls, prefills


def check_computed(engine):
    """Every prompt admitted ahead that ran to its length has all but its last token
    computed (its prompt counted when the queued step was collected)."""
    done = [r for r in engine.admitted_ahead if r.finish_reason == "length"]
    assert done and all(r.num_computed_tokens == r.num_tokens - 1 for r in done)


@pytest.mark.parametrize("prefill_graphs", [True, False])
def test_overlap_admission_gives_the_same_outputs(setup, prefill_graphs):
    """--overlap-admission: prompts arriving while a batch decodes join a step queued behind
    the running one (its decode rows read that step's samples on the device; the prompts are
    prefill-graph replays, or an eager pass). Outputs are those of the plain loop, with
    stop tokens, aborts and a late arrival whose adapter is not loaded yet."""
    base = workload(n=5, seed=6)
    late = workload(n=4, seed=7)
    plain = drive(make_engine(setup, overlap=False), base)
    stop = plain["1"].token_ids[len(plain["1"].token_ids) // 2]
    base = workload(stop_token=stop, n=5, seed=6)

    def arrive(engine, first, last):
        for j in range(first, last):
            prompt, params, adapter = late[j]
            engine.add_request(prompt, params, request_id=f"late{j}", adapter=adapter)

    events = {
        3: lambda e: arrive(e, 0, 2),
        5: lambda e: e.abort("0"),
        7: lambda e: arrive(e, 2, 4),
    }
    plain = drive(make_engine(setup, overlap=False), base, dict(events))
    engine = make_engine(setup, overlap=True, overlap_admission=True, prefill_graphs=prefill_graphs)
    warm_adapters(engine)
    ahead, prefills = count_admitted_ahead(engine)
    got = drive(engine, base, dict(events))
    assert_same(got, plain)
    assert ahead[0] >= 1 and ahead[1] >= 2  # the late prompts joined queued steps
    assert set(prefills.values()) == {1}  # and were not prefilled again
    check_computed(engine)
    assert any(o.finish_reason == "stop" for o in plain.values())


@pytest.mark.parametrize("num_pages", [None, 18])
def test_overlap_admission_with_a_queue(setup, num_pages):
    """More requests than sequence slots: queued prompts start in steps queued ahead as slots
    free up; with a pool too small for every request (18 pages), admission ahead stops where
    pages run short and the normal step preempts. Outputs are the plain loop's."""
    requests = workload(n=8, seed=8)  # lengths differ: slots free up one at a time
    for _, params, _ in requests:
        if num_pages is not None:
            params.max_tokens = 40
    kw = dict(num_pages=num_pages, max_num_seqs=4)
    # Adapters resident in both engines: when a request starts (and so the page pressure)
    # does not depend on when a background load lands.
    plain = drive(warm_adapters(make_engine(setup, overlap=False, **kw)), requests)
    engine = make_engine(setup, overlap=True, overlap_admission=True, **kw)
    warm_adapters(engine)
    ahead, prefills = count_admitted_ahead(engine)
    assert_same(drive(engine, requests), plain)
    if num_pages is None:
        assert ahead[0] >= 1  # queued prompts started in queued steps
        assert set(prefills.values()) == {1}
        check_computed(engine)
    else:
        assert sum(o.num_preemptions for o in plain.values()) > 0  # the pressure is real


@pytest.mark.parametrize("overlap_admission", [True, False])
def test_launch_stats_count_steps_queued_ahead_and_why_not(setup, overlap_admission):
    """``LLMEngine.launch_stats``: a step queued behind the previous one counts as ahead;
    every other step launched while requests ran says why it could not be queued."""
    requests = workload(n=8, seed=8)
    engine = make_engine(setup, overlap=True, overlap_admission=overlap_admission, max_num_seqs=4)
    warm_adapters(engine)
    calls = count_continued(engine)
    # Adapter b never ready to admission ahead (its copy "in flight" as admit_ready looks):
    # its prompts start only in normal steps, which find it resident through ensure
    is_ready = engine.adapters.is_ready
    engine.adapters.is_ready = lambda name: name != "b" and is_ready(name)
    before = dataclasses.asdict(engine.launch_stats)
    for i, (prompt, params, adapter) in enumerate(requests):
        engine.add_request(prompt, params, request_id=str(i), adapter=adapter)
    while engine.has_unfinished():
        engine.step()
    stats = engine.launch_stats
    after = dataclasses.asdict(stats)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["ahead"] == calls[1] > 0  # runner.launch_next: the steps queued ahead
    reasons = {k: v for k, v in delta.items() if k != "ahead"}
    # every step the engine launched after collecting the one before (all but the first)
    assert sum(reasons.values()) == calls[0] - 1
    if overlap_admission:
        assert delta["not_ahead_admission_off"] == 0
        assert delta["not_ahead_no_ready_prompt"] > 0  # b's prompts waited for b
    else:
        assert delta["not_ahead_admission_off"] > 0
        assert delta["not_ahead_no_ready_prompt"] == 0


def test_decode_steps_queue_ahead_while_the_queues_adapters_load(setup):
    """Prompts waiting only for adapters an I/O thread is still reading do not stop the
    running batch's steps from queueing ahead; once loaded they start, and every output is
    the plain loop's. An adapter that fails to load still fails its requests."""
    requests = workload(n=6, seed=3)
    plain = drive(warm_adapters(make_engine(setup, overlap=False)), requests)
    engine = make_engine(setup, overlap=True, overlap_admission=True)
    warm_adapters(engine)
    engine.adapter_cache.evict("b")  # b's requests must wait for its load
    gate = threading.Event()
    pack = engine.adapters._pack
    engine.adapters._pack = lambda name: (name != "b" or gate.wait(30)) and pack(name)
    # b's requests first: the queue's head waits for b while a's and base rows decode
    order = sorted(range(len(requests)), key=lambda i: requests[i][2] != "b")
    for i in order:
        prompt, params, adapter = requests[i]
        engine.add_request(prompt, params, request_id=str(i), adapter=adapter)
    outs = {}
    for _ in range(6):
        outs.update({o.request_id: o for o in engine.step()})
    stats = engine.launch_stats
    assert engine.adapters.stage("b") == "reading" and stats.ahead_while_loading > 0
    gate.set()
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
        engine.check_integrity()
    assert_same(outs, plain)

    engine.add_adapter("broken", setup[1]["a"])
    engine.adapters._pack = lambda name: (_ for _ in ()).throw(ValueError("bad file"))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="base")
    engine.step()
    engine.add_request([5, 6, 8], params, request_id="bad", adapter="broken")
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final["bad"].finish_reason == "error" and "bad file" in final["bad"].error
    assert final["base"].finish_reason == "length"
    assert list(final) == ["bad", "base"]  # failed at once, not when the batch emptied


def test_time_device_gives_the_device_time_of_each_collected_step(setup):
    """``time_device``: on CUDA each step that collected a launched one says how long the
    device spent on it and how long it sat idle before it; off CUDA there is no such
    time. The outputs do not change."""
    requests = workload(n=6, seed=4)
    plain = drive(warm_adapters(make_engine(setup, overlap=True)), requests)
    engine = warm_adapters(make_engine(setup, overlap=True))
    engine.time_device = True
    timings = []
    real_step = engine.step

    def step():
        outputs = real_step()
        if outputs:
            timings.append(engine.last_device)
        return outputs

    engine.step = step
    assert_same(drive(engine, requests), plain)
    assert timings
    if engine.device.type == "cuda":
        assert all(t is not None and t.busy > 0 and t.idle >= 0 for t in timings)
    else:
        assert all(t is None for t in timings)


@pytest.mark.parametrize("in_wait", [True, False])
def test_an_adapter_packed_while_a_step_computes_gets_its_pages_in_that_step(setup, in_wait):
    """A queued request's adapter whose packing finishes while the device computes a step
    is given its pool pages and copy within that step, not at the next step's prefetch
    (which runs after the next step's admission has looked): by the I/O thread that packed
    it, while the engine thread waits for the step (adapter_copy_in_wait, the default), or
    else by the engine thread once the step's results are in."""
    engine = warm_adapters(make_engine(setup, overlap=True, adapter_copy_in_wait=in_wait))
    engine.adapter_cache.evict("b")
    gate = threading.Event()
    pack = engine.adapters._pack
    engine.adapters._pack = lambda name: (name != "b" or gate.wait(30)) and pack(name)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="a", adapter="a")
    engine.step()
    engine.add_request([5, 6, 8], params, request_id="b", adapter="b")
    engine.step()
    assert engine.adapters.stage("b") == "reading"
    collect = engine.runner.collect
    in_collect = []
    thread_loads = engine.adapters.thread_loads

    def collect_after_b_is_packed(pending):
        future = engine.adapters._fetching["b"]
        gate.set()
        future.result(timeout=30)
        in_collect.append(engine.adapters.stage("b"))
        return collect(pending)

    engine.runner.collect = collect_after_b_is_packed
    engine.step()
    assert engine.adapters.stage("b") in ("copying", "ready")
    if in_wait:
        assert in_collect[0] in ("copying", "ready")
        assert engine.adapters.thread_loads == thread_loads + 1
    else:
        assert in_collect[0] == "packed" and engine.adapters.thread_loads == thread_loads
    engine.runner.collect = collect
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(outs["b"].token_ids) == 8
