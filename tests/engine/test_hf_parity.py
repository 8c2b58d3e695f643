"""Greedy tokens and logprobs equal HF transformers' on tiny random models, with requests
joining a running batch."""

from __future__ import annotations

import pytest
import torch
import transformers

from loraserve.engine.args import EngineArgs
from loraserve.request import SamplingParams

NEW_TOKENS = 32

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
    engine = EngineArgs(model=str(model_dir), dtype="float32", device="cpu").create_engine()
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
    assert engine.pool.num_free == engine.pool.num_pages
    for i, prompt in enumerate(ps):
        ours = results[str(i)]
        tokens, logprobs = hf_greedy(model_dir, prompt, NEW_TOKENS)
        assert ours.token_ids == tokens, f"prompt {i}"
        for step, (lp_ours, lp_hf) in enumerate(zip(ours.logprobs, logprobs, strict=True)):
            for tok, value in lp_ours.items():
                assert abs(value - lp_hf[tok].item()) < 1e-4, (i, step, tok)
            top = lp_hf.topk(3).indices.tolist()
            assert set(top) <= set(lp_ours), (i, step)
