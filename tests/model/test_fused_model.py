"""The model on its Triton kernels (fused add+RMSNorm, rotary+KV store, silu*mul, attention;
interpreted on the CPU) against its torch path in fp16, where the kernels' rounding shows:
same greedy tokens, logprobs within fp16 noise. fp32 parity with HF is in tests/engine."""

from __future__ import annotations

from loraserve import LLM, SamplingParams


def test_fp16_triton_path_matches_torch_path(tiny_model_factory) -> None:
    # head_dim 10 (half 5), GQA group 3, odd hidden and intermediate sizes
    model_dir = tiny_model_factory(
        hidden_size=60, intermediate_size=100, num_attention_heads=6, num_key_value_heads=2
    )
    prompts = [[5, 9, 17, 33, 2, 40, 41], [7], [100, 3, 3, 8]]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    outs = {
        backend: LLM(
            model=str(model_dir), dtype="float16", device="cpu", attention_backend=backend
        ).generate(prompts, params)
        for backend in ("torch", "triton")
    }
    for ours, ref in zip(outs["triton"], outs["torch"], strict=True):
        assert ours.token_ids == ref.token_ids
        for got, want in zip(ours.logprobs, ref.logprobs, strict=True):
            assert max(abs(got[t] - want[t]) for t in want) < 1e-2
