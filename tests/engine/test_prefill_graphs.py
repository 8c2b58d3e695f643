"""Prompt rows as padded graph replays (--prefill-graphs, engine/prefill_graphs.py): the
outputs a user sees must be those of the eager steps, for prompts of any length and adapter,
chunked prompts, late arrivals, and steps with more prompts than a graph takes."""

from __future__ import annotations

import random

import pytest

from loraserve.engine.args import EngineArgs
from loraserve.engine.prefill_graphs import MAX_SEQS, token_buckets
from loraserve.request import SamplingParams

from .test_overlap import assert_same, count_calls, drive, warm_adapters


def make_engine(setup, prefill_graphs: bool, **kw):
    model_dir, adapters = setup
    kw.setdefault("prefill_batch_window", 0.0)
    kw.setdefault("cuda_graph_max_batch", 8)
    engine = EngineArgs(
        model=str(model_dir),
        dtype="float32",
        prefill_graphs=prefill_graphs,
        admission_interval=0.0,
        **kw,
    ).create_engine()
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def workload(n: int, seed: int, long: int = 12):
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randrange(2, long))]
        params = SamplingParams(
            max_tokens=rng.randrange(2, 12), temperature=0.0, logprobs=2, ignore_eos=True
        )
        requests.append((prompt, params, [None, "a", "b", "a"][i % 4]))
    return requests


def count_graphed(engine) -> list[int]:
    return count_calls(engine.runner.prefill_graphs, "run")


def test_buckets():
    assert token_buckets(8192) == [64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert token_buckets(300) == [64, 128, 256]
    assert token_buckets(16) == [16]


# triton: the interpreter here, with the graphs' tile maps for attention and LoRA
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_prefill_graphs_give_the_eager_outputs(graph_setup, backend):
    requests = workload(n=6, seed=0)
    kw = dict(lora_backend=backend, attention_backend=backend)

    def arrive(engine):  # prompts joining running decodes: steps with both kinds of rows
        for j, (prompt, params, adapter) in enumerate(workload(n=3, seed=1)):
            engine.add_request(prompt, params, request_id=f"late{j}", adapter=adapter)

    events = {3: arrive}
    plain = drive(make_engine(graph_setup, False, **kw), requests, dict(events))
    engine = make_engine(graph_setup, True, **kw)
    graphed = count_graphed(engine)
    got = drive(engine, requests, dict(events))
    assert_same(got, plain)
    assert graphed[0] >= 2  # the first prefill and the late arrivals' step


def count_eager(engine) -> list[int]:
    return count_calls(engine.runner, "prepare")


def test_chunked_prompts_and_more_prompts_than_a_graph_takes(graph_setup):
    # Budget 48 tokens per step: prompts of up to 60 tokens are prefilled in chunks (the
    # middle chunks sample nothing); 12 prompts at once exceed MAX_SEQS: a step of several
    # replays, no eager pass.
    requests = workload(n=12, seed=3, long=60)
    assert len(requests) > MAX_SEQS
    kw = dict(max_num_batched_tokens=48, max_num_seqs=16, cuda_graph_max_batch=16)
    plain = drive(make_engine(graph_setup, False, **kw), requests)
    engine = make_engine(graph_setup, True, **kw)
    assert engine.runner.prefill_graphs.sizes == [48]
    graphed, eager = count_graphed(engine), count_eager(engine)
    got = drive(engine, requests)
    assert_same(got, plain)
    assert graphed[0] >= 1 and eager[0] == 0


def test_more_prompts_than_a_replay_takes_in_one_step(graph_setup):
    """12 prompts scheduled together: two replays (8 + 4 prompts, in adapter order) in one
    step, each with its own logits rows, and the outputs of the eager pass."""
    requests = workload(n=12, seed=4)
    kw = dict(max_num_seqs=16, cuda_graph_max_batch=16)
    plain = drive(make_engine(graph_setup, False, **kw), requests)
    engine = make_engine(graph_setup, True, **kw)
    warm_adapters(engine)  # every prompt starts in the first step
    graphed, eager = count_graphed(engine), count_eager(engine)
    prompt_steps = engine.runner.prompt_steps
    for i, (prompt, params, adapter) in enumerate(requests):
        engine.add_request(prompt, params, request_id=str(i), adapter=adapter)
    first = engine.step()
    assert graphed[0] == 2 and eager[0] == 0
    assert engine.runner.prompt_steps == prompt_steps + 1  # one step, two replays
    got = {o.request_id: o for o in first}
    while engine.has_unfinished():
        got.update({o.request_id: o for o in engine.step()})
    assert_same(got, plain)
    assert eager[0] == 0


def test_replay_groups():
    from loraserve.engine.prefill_graphs import MAX_GROUPS, PrefillGraphs

    pg = PrefillGraphs.__new__(PrefillGraphs)  # groups() reads only the buckets
    pg.sizes = [64, 128]
    assert pg.groups([5] * 12) == [list(range(8)), list(range(8, 12))]
    assert pg.groups([100, 20, 30, 90]) == [[0, 1], [2, 3]]  # at most 128 tokens each
    assert pg.groups([128, 1]) == [[0], [1]]
    assert pg.groups([129]) is None  # larger than a bucket: eager
    assert pg.groups([100] * (MAX_GROUPS + 1)) is None  # too many replays: eager
    assert pg.groups([]) is None


@pytest.mark.parametrize(
    ("graph_batch", "backend", "expected"),
    [(8, "auto", True), (8, "bmm", False), (0, "auto", False)],
)
def test_prefill_graphs_default_follows_the_decode_graphs(
    graph_setup, graph_batch, backend, expected
):
    """On by default wherever decode graphs are (not for the padded bmm ablation)."""
    model_dir, _ = graph_setup
    engine = EngineArgs(
        model=str(model_dir),
        dtype="float32",
        cuda_graph_max_batch=graph_batch,
        lora_backend=backend,
    ).create_engine()
    assert (engine.runner.prefill_graphs is not None) is expected
    assert engine.config.prefill_graphs is expected


def test_prefill_graphs_need_decode_graphs(graph_setup):
    model_dir, _ = graph_setup
    with pytest.raises(ValueError, match="prefill_graphs needs the decode graphs"):
        EngineArgs(
            model=str(model_dir), dtype="float32", cuda_graph_max_batch=0, prefill_graphs=True
        ).create_engine()


def test_prompts_longer_than_a_tile_with_the_triton_kernels(graph_setup):
    """Prompts of several attention and LoRA row tiles: the tile maps' later blocks."""
    rng = random.Random(7)
    requests = [
        (
            [rng.randrange(3, 200) for _ in range(n)],
            SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True),
            adapter,
        )
        for n, adapter in ((150, "a"), (70, None), (129, "b"))
    ]
    kw = dict(lora_backend="triton", attention_backend="triton")
    plain = drive(make_engine(graph_setup, False, **kw), requests)
    engine = make_engine(graph_setup, True, **kw)
    graphed = count_graphed(engine)
    assert_same(drive(engine, requests), plain)
    # One graphed step when all three start together; on CUDA their adapters' background
    # loads may land in different steps.
    assert graphed[0] >= 1


def test_prefill_graphs_under_page_pressure(graph_setup):
    """Preempted requests are recomputed through the prefill graphs (prompt and outputs so
    far); the outputs are the eager path's and no page is lost. (The adapters load in the
    background and may be evicted under this pressure: which step a request starts in
    depends on timing, its tokens do not.)"""
    requests = workload(n=8, seed=5)
    for _, params, _ in requests:
        params.max_tokens = 40
    plain = drive(make_engine(graph_setup, False, num_pages=18), requests)
    engine = make_engine(graph_setup, True, num_pages=18)
    graphed = count_graphed(engine)
    got = drive(engine, requests)
    assert_same(got, plain)
    assert sum(o.num_preemptions for o in plain.values()) > 0  # the pressure is real
    assert graphed[0] > 2


def test_prefill_graphs_with_an_abort(graph_setup):
    """An abort in the middle: with both adapters resident beforehand, every step is the
    same in both runs, so the aborted request's tokens match too."""
    requests = workload(n=6, seed=6)

    def abort(engine):
        engine.abort("2")

    outs = []
    for graphs in (False, True):
        engine = warm_adapters(make_engine(graph_setup, graphs))
        outs.append(drive(engine, requests, {4: abort}))
    assert_same(outs[1], outs[0])
    assert len(outs[0]["2"].token_ids) < requests[2][1].max_tokens  # the abort cut it short


def test_prefill_graphs_with_tiles_for_small_ranks(graph_setup, tmp_path):
    """Tables for ranks up to 64 (the default): each bucket is also captured with LoRA tiles
    for ranks up to 16, which replays whose adapters all have ranks <= 16 take ("a" rank 4,
    "b" rank 8); a replay with the rank-24 adapter "c" takes the full width (16-row tiles
    would drop its rank rows 16-23). The outputs of the torch reference, eager."""
    from loraserve.adapters.peft import make_random_adapter
    from loraserve.config import ModelConfig

    model_dir, adapters = graph_setup
    config = ModelConfig.from_dir(model_dir)
    wide = make_random_adapter(tmp_path / "c", config, 24, ["q_proj", "down_proj"], seed=3)
    setup = (model_dir, {**adapters, "c": wide})
    requests = workload(n=8, seed=2)
    requests = [(p, s, "c" if i % 4 == 3 else a) for i, (p, s, a) in enumerate(requests)]
    eager = dict(lora_backend="torch", cuda_graph_max_batch=0)  # (CUDA: no graphs of it)
    plain = drive(make_engine(setup, False, **eager), requests, {})
    engine = make_engine(setup, True, lora_backend="triton", max_num_seqs=2)
    graphs = engine.runner.prefill_graphs
    assert graphs.widths == [64, 16]
    got = drive(engine, requests, {})
    assert_same(got, plain)
    assert 0 < graphs.small_steps < graphs.steps
