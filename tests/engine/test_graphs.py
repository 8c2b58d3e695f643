"""Padded static-shape decode steps (the CUDA-graph path; eager on the CPU) give the same
tokens and logprobs as the ordinary path, with adapters and base-model requests mixed."""

from __future__ import annotations

import pytest
import torch

from loraserve.config import LORA_TARGETS
from loraserve.engine.args import EngineArgs
from loraserve.engine.engine import LLMEngine
from loraserve.engine.graphs import DecodeGraphs, capture_sizes
from loraserve.memory.pool import PageKind
from loraserve.request import SamplingParams


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]


@pytest.fixture(scope="module")
def setup(graph_setup):
    return graph_setup


def run(
    model_dir,
    adapters,
    graph_batch,
    names,
    prompts,
    group_tile_cost=None,
    inspect=lambda engine: None,
    **engine_args,
):
    engine = EngineArgs(
        model=str(model_dir), dtype="float32", cuda_graph_max_batch=graph_batch, **engine_args
    ).create_engine()
    if group_tile_cost is not None:
        engine.runner.graphs.group_tile_cost = group_tile_cost
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    for i, (p, a) in enumerate(zip(prompts, names, strict=True)):
        # Different lengths: the last steps decode fewer requests than were running.
        params = SamplingParams(max_tokens=6 + 3 * i, temperature=0.0, logprobs=2, ignore_eos=True)
        engine.add_request(p, params, request_id=str(i), adapter=a)
        if i == 1:
            engine.step()  # later requests join while the first two decode
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
        engine.check_integrity()
    if graph_batch:
        assert engine.runner.graphs.steps > 0, "the padded decode path did not run"
        if group_tile_cost == 0:  # every step with adapter rows grouped
            assert engine.runner.graphs.grouped_steps > 0
    inspect(engine)
    reserved = engine.pool.num_used(PageKind.RESERVED)
    adapter_pages = sum(len(a.pages) for a in engine.adapter_cache.resident())
    assert engine.pool.num_free == engine.pool.num_pages - reserved - adapter_pages
    return [outs[str(i)] for i in range(len(prompts))], reserved


@pytest.mark.parametrize(
    ("graph_batch", "lora_backend", "group_tile_cost"),
    [(2, "auto", None), (8, "auto", 0), (8, "triton", 0), (8, "triton", None)],
)
def test_padded_decode_matches_eager(setup, graph_batch, lora_backend, group_tile_cost):
    """Also with the Triton kernels: rows of one adapter grouped into one segment (16-row
    tiles over a persistent tile map; group_tile_cost 0: every step) or, as this batch
    mostly chooses by default, one segment per row (matrix-vector kernels)."""
    model_dir, adapters = setup
    names = ["a", None, "b", "a", None]
    prompts = [[5, 6, 7], [9] * 12, [30, 31], [44, 45, 46, 47], [8, 8]]
    eager, reserved_eager = run(model_dir, adapters, 0, names, prompts)
    padded, reserved = run(
        model_dir,
        adapters,
        graph_batch,
        names,
        prompts,
        group_tile_cost,
        lora_backend=lora_backend,
    )
    assert (reserved_eager, reserved) == (0, 1)
    for e, p in zip(eager, padded, strict=True):
        assert e.token_ids == p.token_ids
        for le, lp in zip(e.logprobs, p.logprobs, strict=True):
            assert max(abs(le[t] - lp[t]) for t in le) < 1e-5


def test_graphs_built_at_startup_and_dropped_on_shutdown(setup):
    model_dir, _ = setup
    engine = EngineArgs(
        model=str(model_dir), dtype="float32", cuda_graph_max_batch=8
    ).create_engine()
    graphs = engine.runner.graphs
    assert sorted(graphs._static) == [1, 2, 4, 8]  # every size ready before any request
    eager = EngineArgs(model=str(model_dir), dtype="float32", cuda_graph_max_batch=0)
    assert eager.create_engine().runner.graphs is None
    engine.shutdown()
    assert engine.runner.graphs is None
    assert engine.adapters._executor._shutdown


def test_graphs_default_only_with_capturable_backends():
    assert EngineArgs(max_num_seqs=64)._graph_batch("cuda") == 64
    assert EngineArgs()._graph_batch("cpu") == 0
    # The torch reference paths read the batch back to the host: no graphs by default.
    assert EngineArgs(attention_backend="torch")._graph_batch("cuda") == 0
    assert EngineArgs(lora_backend="torch")._graph_batch("cuda") == 0
    assert EngineArgs(lora_backend="bmm", max_num_seqs=8)._graph_batch("cuda") == 8
    with pytest.raises(ValueError, match="--lora-backend torch.*--cuda-graph-max-batch 0"):
        EngineArgs(lora_backend="torch", cuda_graph_max_batch=8)._graph_batch("cuda")
    # On the CPU the padded path runs eagerly with any backend (tests use it).
    assert EngineArgs(lora_backend="torch", cuda_graph_max_batch=8)._graph_batch("cpu") == 8


def test_block_tables_rewritten_only_where_changed_and_always_complete(setup):
    """The incremental block-table fill gives, after any sequence of steps, exactly the
    tables a full rewrite would: each row its request's pages, the scratch page elsewhere."""
    from types import SimpleNamespace

    model_dir, _ = setup
    engine = EngineArgs(
        model=str(model_dir), dtype="float32", cuda_graph_max_batch=4
    ).create_engine()
    graphs = engine.runner.graphs
    static = graphs._static[4]
    scratch = graphs.scratch_page

    def req(rid, pages):
        return SimpleNamespace(request_id=rid, block_table=list(pages))

    def expected(requests):
        cols = [r.block_table for r in requests] + [[]] * (4 - len(requests))
        width = static.hosts[0].shape[0] - static.head
        return torch.tensor([c + [scratch] * (width - len(c)) for c in cols]).t()

    a, b, c = req("a", [3, 4, 5]), req("b", [7]), req("c", [9, 10])
    steps = [[a, b], [a, b], [b], [c, a, b], [a], [c], []]  # [c] after [a]: a shorter table
    for i, requests in enumerate(steps):
        if i == 2:
            a.block_table.append(11)  # a grows by a page
        turn = i % 2  # the two host buffers in turn: each keeps its own record
        tables = static.hosts[turn][static.head :]
        graphs._fill_tables(tables.numpy(), static.tables[turn], requests)
        assert torch.equal(tables, expected(requests)), i


def test_lora_launches_only_for_targets_of_the_steps_adapters(setup, monkeypatch):
    """An eager step launches LoRA kernels only for projections some adapter in it adapts;
    decode graphs replay the smallest captured target set (none, q,k,v,o, all) covering them."""
    import loraserve.model.layers as layers
    from loraserve.config import ALL_TARGETS, QKVO_TARGETS, target_mask

    model_dir, adapters = setup  # "a": q_proj, v_proj; "b": o_proj, down_proj
    calls: list[int] = []
    real = layers.lora_apply

    def counting(x, y, pool, meta, layer, first_target, *args, **kwargs):
        calls.append(first_target)
        return real(x, y, pool, meta, layer, first_target, *args, **kwargs)

    monkeypatch.setattr(layers, "lora_apply", counting)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    launched, chosen = {}, {}
    for graph_batch in (0, 4):
        engine = EngineArgs(
            model=str(model_dir), dtype="float32", cuda_graph_max_batch=graph_batch
        ).create_engine()
        for name, path in adapters.items():
            engine.add_adapter(name, path)
        graphs = engine.runner.graphs
        for adapter in (None, "a", "b"):
            calls.clear()
            engine.add_request([5, 6, 7], params, request_id=str(adapter), adapter=adapter)
            while engine.has_unfinished():
                if graphs is not None and engine.scheduler.running:
                    chosen[adapter] = graphs.targets_for(engine.scheduler.running)
                engine.step()
            if graphs is None:
                launched[adapter] = {LORA_TARGETS[t] for t in calls}
    # Eager: the packed layers whose targets the adapter has (q|k|v starts at q_proj).
    assert launched == {None: set(), "a": {"q_proj"}, "b": {"o_proj", "down_proj"}}
    assert graphs.target_sets == [0, QKVO_TARGETS, ALL_TARGETS]
    assert chosen == {None: 0, "a": QKVO_TARGETS, "b": ALL_TARGETS}
    assert target_mask(["q_proj", "v_proj"]) == 0b101


def test_grouped_lora_segments_and_tile_map(setup):
    """A sorted decode batch: one LoRA segment per run of one adapter's rows (base rows:
    slot -1), empty ones after; the map lists each adapter segment's 16-row tiles after
    their count; a batch whose rows are all one adapter still fits the map."""
    from loraserve.engine.graphs import DecodeGraphs

    model_dir, _ = setup
    engine = EngineArgs(
        model=str(model_dir), dtype="float32", cuda_graph_max_batch=40
    ).create_engine()
    graphs = engine.runner.graphs
    assert graphs.group_lora
    static = graphs._static[40]
    host = static.hosts[0].numpy()
    adapters = [3] * 2 + [5] * 17 + [0] + [-1] * 3
    graphs._fill_groups(host, static.head, adapters)
    n = len(adapters)
    assert host[4, :5].tolist() == [3, 5, 0, -1, -1] and (host[4, 4:] == -1).all()
    assert host[5, :5].tolist() == [0, 2, 19, 20, n] and (host[5, 4:] == n).all()
    area = host[7 : static.head].reshape(-1)
    assert area[0] == 4
    assert area[1:9].reshape(4, 2).tolist() == [[0, 0], [1, 0], [1, 1], [2, 0]]
    graphs._fill_groups(host, static.head, [7] * 40)
    assert area[0] == 3 and area[1:7].reshape(3, 2).tolist() == [[0, 0], [0, 1], [0, 2]]
    graphs._fill_groups(host, static.head, list(range(40)))  # the most entries: 40
    assert area[0] == 40 and area[1 + 2 * 39 : 1 + 2 * 40].tolist() == [39, 0]
    assert 1 + 2 * DecodeGraphs._map_entries(40) <= area.size
    bmm = EngineArgs(
        model=str(model_dir), dtype="float32", cuda_graph_max_batch=8, lora_backend="bmm"
    ).create_engine()
    assert not bmm.runner.graphs.group_lora  # the padded ablation keeps per-row gathers


def test_grouped_graphs_only_where_rows_share_adapters(setup):
    """A step replays the grouped LoRA graphs when group_tile_cost x its 16-row tiles is less
    than its adapter rows; never with --no-group-lora-rows."""
    from types import SimpleNamespace

    model_dir, _ = setup
    graphs = (
        EngineArgs(model=str(model_dir), dtype="float32", cuda_graph_max_batch=8)
        .create_engine()
        .runner.graphs
    )

    def rows(*slots):
        return [SimpleNamespace(adapter_slot=s) for s in slots]

    assert graphs.groups_pay(rows(*[1] * 4, *[2] * 3, None))  # 2 tiles x 3 < 7 rows
    assert not graphs.groups_pay(rows(1, 1, 1, 2, 2, 2, None))  # 6 = 6: not less
    assert not graphs.groups_pay(rows(*range(8)))  # one row each
    assert not graphs.groups_pay(rows(None, None))  # no adapter rows
    # 16 rows of one adapter and 15 of their own (1.94 rows per adapter): 48 > 31
    assert not graphs.groups_pay(rows(*[1] * 16, *range(2, 17)))
    assert graphs.groups_pay(rows(*[1] * 16, *range(2, 5)))  # 4 tiles: 12 < 19 rows
    # a 17th row of one adapter costs it a second tile: 16 rows and 6 singles, 7 tiles x 3
    # = 21 < 22 rows; 17 rows and 6 singles, 24 > 23
    assert graphs.groups_pay(rows(*[1] * 16, *range(2, 8)))
    assert not graphs.groups_pay(rows(*[1] * 17, *range(2, 8)))
    off = (
        EngineArgs(
            model=str(model_dir), dtype="float32", cuda_graph_max_batch=8, group_lora_rows=False
        )
        .create_engine()
        .runner.graphs
    )
    assert not off.group_lora and not off.groups_pay(rows(1, 1, 1, 1))


def test_lora_side_stream_gives_the_same_tokens(setup):
    """--lora-side-stream: each LoRA shrink on a second CUDA stream beside its base GEMM
    (forked and joined inside the captured decode graphs, and in eager steps). The same
    tokens and logprobs as on one stream; on the CPU there is no second stream."""
    from loraserve.model.layers import PackedLinear

    model_dir, adapters = setup
    names = ["a", None, "b", "a", None]
    prompts = [[5, 6, 7], [9] * 12, [30, 31], [44, 45, 46, 47], [8, 8]]
    one, _ = run(model_dir, adapters, 8, names, prompts)
    two, _ = run(model_dir, adapters, 8, names, prompts, lora_side_stream=True)
    for a, b in zip(one, two, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert max(abs(la[t] - lb[t]) for t in la) < 1e-5
    engine = EngineArgs(
        model=str(model_dir), dtype="float32", cuda_graph_max_batch=8, lora_side_stream=True
    ).create_engine()
    streams = {m.lora_stream for m in engine.model.modules() if isinstance(m, PackedLinear)}
    assert len(streams) == 1
    assert (streams.pop() is not None) == (engine.device.type == "cuda")


def test_lora_rank_pack_gives_the_same_tokens(setup, monkeypatch):
    """--lora-rank-pack: the decode expand reads several output tiles' B^T rows of a small
    rank in one load. The same tokens and logprobs as without it (Triton kernels, one
    segment per row), and the decode expands did run packed."""
    import loraserve.kernels.lora as lora

    model_dir, adapters = setup
    names = ["a", None, "b", "a", None]
    prompts = [[5, 6, 7], [9] * 12, [30, 31], [44, 45, 46, 47], [8, 8]]
    packed = []
    real = lora._expand

    def expand(*args):
        packed.append(args[-1].rank_pack)
        return real(*args)

    monkeypatch.setattr(lora, "_expand", expand)
    # no start-up compiles on CUDA: their probes of tiles for small ranks pack by default
    monkeypatch.setattr(LLMEngine, "_precompile", lambda self: None)
    # (fused decode off: these ranks would run the fused kernel's small-rank graphs)
    common = dict(group_tile_cost=1e9, lora_backend="triton", lora_fused_decode=False)
    plain, _ = run(model_dir, adapters, 8, names, prompts, **common)
    assert packed and not any(packed)
    packed.clear()
    rows, _ = run(model_dir, adapters, 8, names, prompts, lora_rank_pack=True, **common)
    assert any(packed)
    for a, b in zip(plain, rows, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert max(abs(la[t] - lb[t]) for t in la) < 1e-5


def test_lora_fused_decode_gives_the_same_tokens(setup, monkeypatch):
    """--lora-fused-decode (the default where --max-lora-rank is 16 or less; these adapters
    have ranks 4 and 8): decode LoRA in one launch per layer call. The same tokens and
    logprobs as the two-launch kernels (Triton, one segment per row), the fused kernel did
    run and prompt steps kept the two launches."""
    import loraserve.kernels.lora as lora

    model_dir, adapters = setup
    names = ["a", None, "b", "a", None]
    prompts = [[5, 6, 7], [9] * 12, [30, 31], [44, 45, 46, 47], [8, 8]]
    calls = {"fused": 0, "expand": 0}
    real_fused, real_expand = lora._fused, lora._expand

    def fused(*args):
        calls["fused"] += 1
        return real_fused(*args)

    def expand(*args):
        calls["expand"] += 1
        return real_expand(*args)

    monkeypatch.setattr(lora, "_fused", fused)
    monkeypatch.setattr(lora, "_expand", expand)
    common = dict(group_tile_cost=1e9, lora_backend="triton", max_lora_rank=8)
    plain, _ = run(model_dir, adapters, 8, names, prompts, lora_fused_decode=False, **common)
    assert calls["fused"] == 0 and calls["expand"] > 0
    calls.update(fused=0, expand=0)
    one, _ = run(model_dir, adapters, 8, names, prompts, **common)
    assert calls["fused"] > 0 and calls["expand"] > 0  # decode steps fused, prompts not
    for a, b in zip(plain, one, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert max(abs(la[t] - lb[t]) for t in la) < 1e-5


def test_small_rank_graphs_where_tables_are_wider(setup, tmp_path, monkeypatch):
    """Tables laid out for ranks above 16 (--max-lora-rank 64): decode steps whose adapters
    all have ranks <= 16 (--lora-fused-max-rank) replay graphs with the fused kernel's
    tiles, the others keep the two launches (a rank-24 adapter's rows in a 16-row fused
    tile would lose rows 16-23). The same tokens and logprobs as without the fused kernel
    either way."""
    import loraserve.kernels.lora as lora
    from loraserve.adapters.peft import make_random_adapter
    from loraserve.config import ModelConfig

    model_dir, adapters = setup
    config = ModelConfig.from_dir(model_dir)
    wide = make_random_adapter(tmp_path / "c", config, 24, ["q_proj"], seed=3)
    adapters = {**adapters, "c": wide}
    prompts = [[5, 6, 7], [9] * 12, [30, 31], [44, 45, 46, 47], [8, 8]]
    fused = []
    real = lora._fused

    def fused_call(*args):
        fused.append(args[3].max_rank)
        return real(*args)

    monkeypatch.setattr(lora, "_fused", fused_call)
    ranks = []  # each checked step's largest adapter rank
    real_rank = DecodeGraphs.step_rank

    def step_rank(self, requests):
        ranks.append(real_rank(self, requests))
        return ranks[-1]

    monkeypatch.setattr(DecodeGraphs, "step_rank", step_rank)
    counts = {}

    def inspect(engine):
        graphs = engine.runner.graphs
        counts.update(steps=graphs.steps, small=graphs.small_steps, rank=graphs.small_rank)

    common = dict(group_tile_cost=1e9, lora_backend="triton", max_lora_rank=64)
    with_c = ["a", "c", "b", "a", None]
    # --lora-fused-max-rank 32: the rank-24 adapter's steps fused too (tile shapes of 8, 16
    # and 32 rank rows in one launch)
    for names, limit in ((["a", None, "b", "a", None], 16), (with_c, 16), (with_c, 32)):
        plain, _ = run(model_dir, adapters, 8, names, prompts, lora_fused_decode=False, **common)
        assert not fused
        ranks.clear()
        got, _ = run(
            model_dir, adapters, 8, names, prompts, inspect=inspect, lora_fused_max_rank=limit,
            **common,
        )  # fmt: skip
        for a, b in zip(plain, got, strict=True):
            assert a.token_ids == b.token_ids
            for la, lb in zip(a.logprobs, b.logprobs, strict=True):
                assert max(abs(la[t] - lb[t]) for t in la) < 1e-5
        assert counts["rank"] == limit and 0 < counts["small"] and set(fused) == {limit}
        assert counts["small"] == sum(r <= limit for r in ranks)
        assert (24 in ranks) == ("c" in names)  # with limit 16 its steps: two launches
        fused.clear()


def test_eager_steps_take_tiles_for_their_adapters_ranks(setup, tmp_path, monkeypatch):
    """Tables laid out for ranks up to 64 (the server's default), every step eager: a prompt
    or decode part whose adapters all have ranks <= 16 runs tiles for 16 rank rows (its
    decode rows the fused kernel), a part with the rank-24 adapter tiles for 64 (16 would
    drop its rank rows 16-23). The same tokens and logprobs as the torch reference."""
    import loraserve.kernels.lora as lora
    from loraserve.adapters.peft import make_random_adapter
    from loraserve.config import ModelConfig

    model_dir, adapters = setup
    config = ModelConfig.from_dir(model_dir)
    wide = make_random_adapter(tmp_path / "c", config, 24, ["q_proj"], seed=3)
    adapters = {**adapters, "c": wide}
    prompts = [[5, 6, 7], [9] * 12, [30, 31], [44, 45, 46, 47], [8, 8]]
    seen = []  # (max_rank, decode part, fused) of every triton LoRA call
    real = lora.pick_tiles

    def pick_tiles(batch, *args):
        tiles = real(batch, *args)
        seen.append((batch.max_rank, batch.max_seg_len == 1, tiles.fused > 0))
        return tiles

    monkeypatch.setattr(lora, "pick_tiles", pick_tiles)
    monkeypatch.setattr(LLMEngine, "_precompile", lambda self: None)  # (CUDA) probes of both
    for names, widths in (
        (["a", None, "b", "a", None], {16}),
        (["a", "c", "b", "a", None], {16, 64}),
    ):
        ref, _ = run(model_dir, adapters, 0, names, prompts, lora_backend="torch", max_lora_rank=64)
        assert not seen
        got, _ = run(
            model_dir, adapters, 0, names, prompts, lora_backend="triton", max_lora_rank=64
        )
        for a, b in zip(ref, got, strict=True):
            assert a.token_ids == b.token_ids
            for la, lb in zip(a.logprobs, b.logprobs, strict=True):
                assert max(abs(la[t] - lb[t]) for t in la) < 1e-4
        assert {rank for rank, _, _ in seen} == widths
        # prompt parts and decode parts both narrowed (with "c", which prompts share a step
        # with its prompt depends on when each adapter is loaded: on CUDA every one did)
        for decode in (False, True) if "c" not in names else ():
            assert any(rank == 16 and d == decode for rank, d, _ in seen), sorted(set(seen))
        assert all(fused == (d and rank == 16) for rank, d, fused in seen)
        seen.clear()
