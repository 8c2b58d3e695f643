"""Greedy tokens and logprobs equal HF transformers' on tiny random models, with requests
joining a running batch."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from loraserve.engine.args import EngineArgs
from loraserve.memory.pool import PageKind
from loraserve.request import SamplingParams

NEW_TOKENS = 32
# On the GPU machine: LORASERVE_TEST_DEVICE=cuda runs these with the Triton attention path.
DEVICE = os.environ.get("LORASERVE_TEST_DEVICE", "cpu")

MODELS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "qkv-bias": dict(attention_bias=True),
    "mlp-bias": dict(mlp_bias=True),
    "head-dim-24": dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1),
    "head-dim-20-explicit": dict(hidden_size=64, num_attention_heads=4, head_dim=20),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=True),
    "mistral": dict(arch="mistral"),
    "llama3-rope": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
}


def hf_greedy(model_dir, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [lg[0].float().log_softmax(-1) for lg in out.logits]
    return tokens, logprobs


def prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_hf_with_late_arrivals(tiny_model_factory, name):
    model_dir = tiny_model_factory(**MODELS[name])
    engine = EngineArgs(model=str(model_dir), dtype="float32", device=DEVICE).create_engine()
    ps = prompts(engine.config.model.vocab_size, [5, 17, 33, 9, 21])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=3, ignore_eos=True)
    results = {}
    for i in range(3):
        engine.add_request(ps[i], params, request_id=str(i))
    for _ in range(4):  # the first three are decoding when the others arrive
        for out in engine.step():
            results[out.request_id] = out
    for i in range(3, len(ps)):
        engine.add_request(ps[i], params, request_id=str(i))
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id] = out
    engine.check_integrity()
    # On CUDA the decode graphs keep one scratch page (RESERVED) for their padding rows.
    assert engine.pool.num_free == engine.pool.num_pages - engine.pool.num_used(PageKind.RESERVED)
    for i, prompt in enumerate(ps):
        ours = results[str(i)]
        tokens, logprobs = hf_greedy(model_dir, prompt, NEW_TOKENS)
        assert ours.token_ids == tokens, f"prompt {i}"
        for step, (lp_ours, lp_hf) in enumerate(zip(ours.logprobs, logprobs, strict=True)):
            for tok, value in lp_ours.items():
                assert abs(value - lp_hf[tok].item()) < 1e-4, (i, step, tok)
            top = lp_hf.topk(3).indices.tolist()
            assert set(top) <= set(lp_ours), (i, step)


@pytest.mark.parametrize("name", ["gqa", "head-dim-24"])
def test_triton_attention_path_gives_same_tokens(tiny_model_factory, name):
    """The engine with the Triton attention kernel (interpreted on the CPU) against the torch
    reference path, on a batch with late arrivals."""
    model_dir = tiny_model_factory(**MODELS[name])
    ps = prompts(211, [7, 19, 4])
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        engine = EngineArgs(
            model=str(model_dir), dtype="float32", device=DEVICE, attention_backend=backend
        ).create_engine()
        engine.add_request(ps[0], params, request_id="0")
        engine.step()
        engine.add_request(ps[1], params, request_id="1")
        engine.add_request(ps[2], params, request_id="2")
        outs = {}
        while engine.has_unfinished():
            outs.update({o.request_id: o for o in engine.step()})
        results[backend] = outs
    for i in "012":
        assert results["torch"][i].token_ids == results["triton"][i].token_ids
        for a, b in zip(results["torch"][i].logprobs, results["triton"][i].logprobs, strict=True):
            assert max(abs(a[t] - b[t]) for t in a) < 1e-4


def test_sharded_checkpoint_loads_like_one_file(tiny_model_factory, tmp_path):
    """save_pretrained with a small max_shard_size writes shards + an index."""
    model_dir = tiny_model_factory(**MODELS["gqa"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = []
    for d in (model_dir, sharded):
        engine = EngineArgs(model=str(d), dtype="float32", device=DEVICE).create_engine()
        engine.add_request([5, 9, 11, 40], params, request_id="r")
        while engine.has_unfinished():
            out = engine.step()
        outs.append(out[-1].token_ids)
    assert outs[0] == outs[1]
