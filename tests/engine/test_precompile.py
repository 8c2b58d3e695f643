"""Kernel precompilation at start-up: one probe forward per distinct block-size choice, on a
scratch page that goes back to the pool, leaving the engine's outputs unchanged."""

from __future__ import annotations

from loraserve.adapters.peft import make_random_adapter
from loraserve.config import ModelConfig
from loraserve.engine.args import EngineArgs
from loraserve.engine.precompile import (
    _lora_key,
    _shapes,
    decode_batch_sizes,
    precompile,
    prefill_shapes,
)
from loraserve.kernels.attention import _block_m
from loraserve.model.layers import PackedLinear
from loraserve.request import SamplingParams


def _linears(engine):
    return [m for m in engine.model.modules() if isinstance(m, PackedLinear)]


def test_probe_lengths_cover_every_variant(tiny_model_factory):
    engine = EngineArgs(model=str(tiny_model_factory()), dtype="float32").create_engine()
    linears = _linears(engine)
    assert len(linears) == 4 * engine.config.model.num_hidden_layers
    sms = 132
    shapes = prefill_shapes(linears, 2, 64, 300, 64, 512, sms)

    def key(n, s):
        return _block_m(2, n), _lora_key(_shapes(linears), 64, n, s, sms)

    keys = {key(n, s) for n in range(2, 257) for s in range(1, min(64, (512 - n) // 2 + 1) + 1)}
    probed = {key(n, s) for n, s in shapes}
    assert probed == keys and len(shapes) == len(keys)
    # LoRA prefill tiles (16/32/64 rows) and attention rows change at 17 and 33 tokens.
    assert {2, 9, 17, 33} <= {n for n, _ in shapes}
    # Enough segments bring the shrink's K split down to 1, a variant of its own.
    assert any(s > 1 for _, s in shapes)
    assert all(n + 2 * (s - 1) <= 512 for n, s in shapes)
    sizes = decode_batch_sizes(linears, 64, 256, sms)
    all_keys = {_lora_key(_shapes(linears), 64, 1, s, sms) for s in range(1, 257)}
    assert {_lora_key(_shapes(linears), 64, 1, s, sms) for s in sizes} == all_keys
    assert sizes[0] == 1 and sizes == sorted(set(sizes))
    # Fused decode LoRA (max rank <= 16) compiles one variant whatever the batch: its output
    # split is a runtime int. Two launches at rank 8 need several.
    assert decode_batch_sizes(linears, 8, 256, sms, fused=True) == [1]
    assert len(decode_batch_sizes(linears, 8, 256, sms)) > 1
    assert len(decode_batch_sizes(linears, 64, 256, sms, fused=True)) == len(sizes)


def test_precompile_probes_leave_the_engine_unchanged(tiny_model_factory, tmp_path):
    model_dir = tiny_model_factory()
    config = ModelConfig.from_dir(model_dir)
    adapter = make_random_adapter(tmp_path / "a", config, 8, ["q_proj", "down_proj"], seed=3)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], list(range(3, 40))]
    outputs = []
    for probe in (False, True):
        engine = EngineArgs(
            model=str(model_dir), dtype="float32", lora_backend="triton"
        ).create_engine()
        engine.add_adapter("a", str(adapter))
        free = engine.pool.num_free
        if probe:
            forwards = precompile(
                engine.model, engine.pool, engine.adapter_cache, "triton", 16, 128, 64, 8, 8
            )
            assert forwards >= 4
            assert engine.pool.num_free == free  # the scratch page went back
        for i, p in enumerate(prompts):
            engine.add_request(p, params, request_id=str(i), adapter="a" if i else None)
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step()})
        outputs.append([done[k] for k in sorted(done)])
    # The adapter loads in the background, so the step in which request 1 joins (and with it
    # the batch shapes, hence fp32 rounding) may differ between the two runs.
    for plain, probed in zip(*outputs, strict=True):
        assert plain.token_ids == probed.token_ids
        for a, b in zip(plain.logprobs, probed.logprobs, strict=True):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) < 1e-5


def test_precompile_probes_the_narrow_tiles_too(tiny_model_factory, monkeypatch):
    """Tables for ranks up to 64: steps whose adapters all have ranks <= 16 run tiles for 16
    (AdapterCache.width_for), so every prompt and eager decode variant is compiled for both
    widths; tables for 16 have no narrower width."""
    from loraserve.engine import precompile as module

    seen = []
    real = module._Probe.run

    def run(self, q_lens, max_seq_len, max_rank=None):
        seen.append((max_rank, max(q_lens) > 1))
        return real(self, q_lens, max_seq_len, max_rank)

    monkeypatch.setattr(module._Probe, "run", run)
    model_dir = tiny_model_factory()
    for width, widths in ((64, {64, 16}), (16, {16})):
        engine = EngineArgs(
            model=str(model_dir), dtype="float32", lora_backend="triton", max_lora_rank=width
        ).create_engine()
        assert engine.adapter_cache.small_rank == (16 if width > 16 else 0)
        precompile(engine.model, engine.pool, engine.adapter_cache, "triton", 16, 64, 32, 4, 4)
        for prompt in (True, False):
            assert {rank for rank, p in seen if p == prompt} == widths
        seen.clear()
