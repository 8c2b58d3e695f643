"""Multi-LoRA generation equals PEFT's: adapters made with PEFT itself, one mixed batch in
which every prompt uses a different adapter (or the base model), against PEFT's own mixed
batch (``generate(..., adapter_names=[...])``)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from loraserve.engine.args import EngineArgs
from loraserve.entrypoints.llm import LLM
from loraserve.memory.pool import PageKind
from loraserve.request import SamplingParams

DEVICE = os.environ.get("LORASERVE_TEST_DEVICE", "cpu")
NEW_TOKENS = 24
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> LoraConfig kwargs
ADAPTERS = {
    "q-r1": dict(r=1, lora_alpha=2, target_modules=["q_proj"]),
    "k-r2": dict(r=2, lora_alpha=4, target_modules=["k_proj"]),
    "v-r8": dict(r=8, lora_alpha=16, target_modules=["v_proj"]),
    "o-r16": dict(r=16, lora_alpha=8, target_modules=["o_proj"]),
    "gate-r8": dict(r=8, lora_alpha=8, target_modules=["gate_proj"]),
    "up-r64": dict(r=64, lora_alpha=32, target_modules=["up_proj"]),
    "down-r16": dict(r=16, lora_alpha=16, target_modules=["down_proj"]),
    "all-r128": dict(r=128, lora_alpha=64, target_modules=ALL),
    "all-linear-rslora": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "patterns": dict(
        r=8,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4, "down_proj": 2},
        alpha_pattern={"q_proj": 32},
    ),
    "layers-fp16": dict(r=4, lora_alpha=8, target_modules=ALL, layers_to_transform=[1]),
}
FP16 = {"layers-fp16"}


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory):
    return tiny_model_factory(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kw))
        with torch.no_grad():  # keep the deltas moderate so greedy paths stay well apart
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.mul_(0.5)
        if name in FP16:
            peft_model = peft_model.half()
        peft_model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def peft_mixed_batch(base_dir, adapter_dirs, prompts, names):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    used = [n for n in dict.fromkeys(names) if n is not None]
    model = PeftModel.from_pretrained(base, adapter_dirs[used[0]], adapter_name=used[0])
    for n in used[1:]:
        model.load_adapter(adapter_dirs[n], adapter_name=n)
    model = model.float().eval()
    ids = torch.tensor(prompts)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        adapter_names=[n if n is not None else "__base__" for n in names],
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    tokens = out.sequences[:, ids.shape[1] :].tolist()
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [B, steps, vocab]
    return tokens, logprobs


def assert_matches_peft(results, names, want_tokens, want_logprobs):
    """Request str(i) (adapter names[i]) has PEFT's tokens, and its logprobs within 1e-4."""
    for i, name in enumerate(names):
        ours = results[str(i)]
        assert ours.token_ids == want_tokens[i], f"adapter {name}"
        for step, lp in enumerate(ours.logprobs):
            for tok, value in lp.items():
                assert abs(value - want_logprobs[i, step, tok].item()) < 1e-4, (name, step)


def equal_length_prompts(n, length=11, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (n, length), generator=g).tolist()


@pytest.mark.parametrize("lora_backend", ["torch", "triton"])
def test_mixed_batch_matches_peft(base_dir, adapter_dirs, lora_backend):
    names = [*ADAPTERS, None]
    prompts = equal_length_prompts(len(names))
    want_tokens, want_logprobs = peft_mixed_batch(base_dir, adapter_dirs, prompts, names)

    engine = EngineArgs(
        model=str(base_dir),
        dtype="float32",
        device=DEVICE,
        max_lora_rank=128,
        lora_backend=lora_backend,
    ).create_engine()
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=2, ignore_eos=True)
    results = {}
    half = len(names) // 2
    for i in range(half):  # half now, half while the first are decoding
        engine.add_request(prompts[i], params, request_id=str(i), adapter=names[i])
    for _ in range(3):
        results.update({o.request_id: o for o in engine.step()})
    for i in range(half, len(names)):
        engine.add_request(prompts[i], params, request_id=str(i), adapter=names[i])
    while engine.has_unfinished():
        results.update({o.request_id: o for o in engine.step()})
        engine.check_integrity()

    assert_matches_peft(results, names, want_tokens, want_logprobs)
    # Every adapter changed the output relative to the base model.
    base_tokens = want_tokens[-1]
    assert all(t != base_tokens for t in want_tokens[:-1])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_launches"])
def test_small_max_rank_kernels_match_peft(base_dir, adapter_dirs, monkeypatch, fused):
    """With max_lora_rank <= 16 decode LoRA runs fused, in one launch per call (the
    default), or with --no-lora-fused-decode in two packed launches (dense shrink columns,
    several output tiles' B^T rows per expand load): PEFT's tokens and logprobs either way,
    and the decode calls did run in the form asked for."""
    import loraserve.kernels.lora as lora

    names = [n for n, kw in ADAPTERS.items() if kw["r"] <= 16] + [None]
    prompts = equal_length_prompts(len(names), seed=6)
    want_tokens, want_logprobs = peft_mixed_batch(base_dir, adapter_dirs, prompts, names)
    decode_tiles = []
    real_expand, real_fused = lora._expand, lora._fused

    def expand(*args):
        if args[-1].block_m == 1:
            decode_tiles.append(args[-1])
        return real_expand(*args)

    def fused_call(*args):
        decode_tiles.append(args[-1])
        return real_fused(*args)

    monkeypatch.setattr(lora, "_expand", expand)
    monkeypatch.setattr(lora, "_fused", fused_call)
    engine = EngineArgs(
        model=str(base_dir), dtype="float32", device=DEVICE, max_lora_rank=16,
        lora_backend="triton", lora_fused_decode=fused,
    ).create_engine()  # fmt: skip
    for name in names[:-1]:
        engine.add_adapter(name, adapter_dirs[name])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=2, ignore_eos=True)
    for i, name in enumerate(names):
        engine.add_request(prompts[i], params, request_id=str(i), adapter=name)
    results = {}
    while engine.has_unfinished():
        results.update({o.request_id: o for o in engine.step()})
    if fused:
        assert decode_tiles and all(t.fused for t in decode_tiles)
    else:
        assert decode_tiles and all(t.dense and t.rank_pack and not t.fused for t in decode_tiles)
    assert_matches_peft(results, names, want_tokens, want_logprobs)


def test_small_pool_evicts_and_reloads_adapters(base_dir, adapter_dirs):
    names = ["all-r128", "up-r64", "down-r16", "all-linear-rslora", "o-r16", None]
    prompts = equal_length_prompts(len(names), seed=9)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    big = LLM(model=str(base_dir), dtype="float32", max_lora_rank=128, adapters=adapter_dirs)
    want = [o.token_ids for o in big.generate(prompts, params, adapter=names)]
    cache = big.engine.adapter_cache
    pages = {n: cache.pages_needed(big.engine.adapter_store.get(n)) for n in names if n}
    # Room for the largest adapter and a sequence's KV, not for every adapter at once.
    small = LLM(
        model=str(base_dir),
        dtype="float32",
        max_lora_rank=128,
        adapters=adapter_dirs,
        num_pages=max(pages.values()) + 4,
        max_num_seqs=2,
    )
    for _ in range(2):  # the second round reloads what the first evicted
        got = [o.token_ids for o in small.generate(prompts, params, adapter=names)]
        assert got == want
        small.engine.check_integrity()
    stats = small.engine.adapter_cache.stats
    assert stats.gpu_evictions > 0 and stats.gpu_loads > len(pages)
    pool = small.engine.pool
    adapter_pages = sum(len(a.pages) for a in small.engine.adapter_cache.resident())
    assert pool.num_free == pool.num_pages - pool.num_used(PageKind.RESERVED) - adapter_pages


def test_unknown_adapter_is_a_key_error_before_anything_runs(base_dir, adapter_dirs):
    llm = LLM(model=str(base_dir), dtype="float32", adapters={"v": adapter_dirs["v-r8"]})
    with pytest.raises(KeyError, match="nope"):
        llm.generate([[5, 6], [7, 8]], SamplingParams(max_tokens=2), adapter=["v", "nope"])
    assert not llm.engine.has_unfinished()


def test_add_and_remove_adapter(base_dir, adapter_dirs):
    llm = LLM(model=str(base_dir), dtype="float32")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    base = llm.generate([[5, 6, 7]], params)[0].token_ids
    llm.add_adapter("q", adapter_dirs["all-linear-rslora"])
    with_adapter = llm.generate([[5, 6, 7]], params, adapter="q")[0].token_ids
    assert with_adapter != base
    llm.remove_adapter("q")
    assert "q" not in llm.list_adapters()
    llm.engine.check_integrity()
    with pytest.raises(KeyError):
        llm.generate([[5, 6, 7]], params, adapter="q")


def test_bad_adapter_fails_alone(base_dir, adapter_dirs, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapter_dirs["v-r8"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"corrupt")
    llm = LLM(model=str(base_dir), dtype="float32", adapters={"good": adapter_dirs["v-r8"]})
    llm.add_adapter("bad", bad)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [5, 6, 7], [5, 6, 7]], params, adapter=["good", "bad", None])
    assert outs[1].finish_reason == "error" and "bad" in outs[1].error
    assert len(outs[0].token_ids) == 4 and len(outs[2].token_ids) == 4
    llm.engine.check_integrity()


def test_random_workload_with_adapters_keeps_pool_consistent(base_dir, adapter_dirs):
    """Random arrivals, adapters and aborts on a tight pool: evictions happen, every step's
    integrity check passes, and nothing leaks at the end."""
    import random

    rng = random.Random(7)
    names = [*adapter_dirs, None]
    engine = EngineArgs(
        model=str(base_dir),
        dtype="float32",
        max_lora_rank=128,
        max_loras=4,
        num_pages=40,
        max_num_batched_tokens=64,
    ).create_engine()
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    live: set[str] = set()
    for i in range(120):
        if rng.random() < 0.35:
            prompt = [rng.randrange(3, 200) for _ in range(rng.randrange(2, 30))]
            params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0.0)
            live.add(engine.add_request(prompt, params, str(i), adapter=rng.choice(names)))
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            engine.abort(victim)
            live.discard(victim)
        live -= {o.request_id for o in engine.step() if o.finished}
        engine.check_integrity()
    while engine.has_unfinished():
        live -= {o.request_id for o in engine.step() if o.finished}
        engine.check_integrity()
    assert not live
    assert engine.adapter_cache.stats.gpu_evictions > 0
    assert all(a.refcount == 0 for a in engine.adapter_cache.resident())
    adapter_pages = sum(len(a.pages) for a in engine.adapter_cache.resident())
    reserved = engine.pool.num_used(PageKind.RESERVED)  # CUDA: the graphs' scratch page
    assert engine.pool.num_free == engine.pool.num_pages - reserved - adapter_pages


def test_pool_tier_hits_and_misses_count_requests(base_dir, adapter_dirs):
    llm = LLM(model=str(base_dir), dtype="float32", adapters={"v": adapter_dirs["v-r8"]})
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    stats = llm.engine.adapter_cache.stats
    llm.generate([[5, 6, 7]], params, adapter="v")
    assert (stats.gpu_hits, stats.gpu_misses, stats.gpu_loads) == (0, 1, 1)
    llm.generate([[5, 6, 7], [8, 9]], params, adapter="v")
    assert (stats.gpu_hits, stats.gpu_misses, stats.gpu_loads) == (2, 1, 1)


def test_mixed_step_runs_decode_rows_in_decode_form(base_dir, adapter_dirs):
    """A step with decoding and prefilling adapter requests gives the decode rows one
    single-row segment each (matrix-vector kernels) and the prefill rows their own segments."""
    engine = EngineArgs(
        model=str(base_dir),
        dtype="float32",
        device=DEVICE,
        max_lora_rank=128,
        cuda_graph_max_batch=0,  # pure decode steps eager too (they build LoRA inputs)
    ).create_engine()
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    seen = []
    build = engine.runner._lora_inputs

    def record(*args):
        lora = build(*args)
        seen.append(lora)
        return lora

    engine.runner._lora_inputs = record
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    names = list(ADAPTERS)
    prompts = equal_length_prompts(4)
    for i in range(2):  # two decoding (same adapter: still one segment per row) ...
        engine.add_request(prompts[i], params, request_id=str(i), adapter=names[0])
    started = set()
    while started != {"0", "1"}:  # until both have prefilled (their adapter loads first;
        # a background load may finish between the two admissions, so they can start in
        # different steps)
        started |= {out.request_id for out in engine.step() if out.token_ids}
    engine.add_request(prompts[2], params, request_id="2", adapter=names[1])  # ... and a prefill
    engine.add_request(prompts[3], params, request_id="3", adapter=None)
    mixed = None
    while mixed is None or mixed.decode is None and engine.has_unfinished():
        engine.step()
        mixed = seen[-1] if seen else None
    assert mixed.decode is not None
    assert mixed.decode.max_seg_len == 1 and mixed.decode.num_segments == 2
    assert mixed.decode.seg_start.tolist() == [0, 1, 2]
    assert mixed.meta.num_segments == 1 and mixed.meta.max_seg_len == len(prompts[2])
    first, end = mixed.meta.seg_start.tolist()
    assert end - first == len(prompts[2])
    assert first >= 2  # after every decode row (request 3, base-only, may be one by now)
    while engine.has_unfinished():
        engine.step()
    assert seen[-1].decode is None and seen[-1].meta.max_seg_len == 1  # pure decode


def test_adapter_load_finishing_mid_pass_keeps_arrival_order(base_dir, adapter_dirs):
    """Two queued requests of one adapter: when its load completes between the scheduler's
    two readiness checks, the later request must not start before the earlier one."""
    engine = EngineArgs(model=str(base_dir), dtype="float32", device="cpu").create_engine()
    name = next(iter(ADAPTERS))
    engine.add_adapter(name, adapter_dirs[name])
    real = engine.adapters.ensure
    calls = []

    def ensure(adapter, protect=()):
        calls.append(adapter)
        if len(calls) == 1:  # the first check: not ready yet, and the load lands right after
            while not real(adapter):
                time.sleep(0.001)
            return False
        return real(adapter, protect)

    engine.adapters.ensure = ensure
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompts = equal_length_prompts(2)
    for i in range(2):
        engine.add_request(prompts[i], params, request_id=str(i), adapter=name)
    first = None
    while first is None:
        scheduled = engine.scheduler.schedule()
        first = [r.request_id for r in scheduled.requests] or None
    assert first == ["0", "1"]
    # the pass that found it not ready counted a wait for an adapter ready by its end
    stats = engine.scheduler.stats
    assert (stats.adapter_waits, stats.wait_ready) == (1, 1)
