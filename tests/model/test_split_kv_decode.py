"""The model hands its batch's max_seq_len to paged attention, so decode steps take the
split-KV path (made to split short contexts here): same tokens and logprobs as the torch path."""

from __future__ import annotations

from loraserve import LLM, SamplingParams
from loraserve.kernels import attention


def test_decode_through_split_kv_matches_torch_path(tiny_model_factory, monkeypatch) -> None:
    model_dir = tiny_model_factory(num_attention_heads=4, num_key_value_heads=2)
    prompts = [[5, 9, 17, 33, 2, 40, 41, 8, 8, 19, 23, 60, 61, 62, 63, 64, 3], [7], [100, 3]]
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)
    outs = {"torch": LLM(model=str(model_dir), device="cpu").generate(prompts, params)}

    launched: list[tuple] = []
    kernel = attention._paged_decode_split_kernel

    class Spy:
        def __getitem__(self, grid: tuple):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(attention, "_MIN_SPLIT_TOKENS", 4)  # split contexts of 8+ tokens
    monkeypatch.setattr(attention, "_paged_decode_split_kernel", Spy())
    llm = LLM(model=str(model_dir), device="cpu", attention_backend="triton")
    outs["triton"] = llm.generate(prompts, params)

    assert launched and all(grid[0] > 1 for grid in launched)
    for ours, ref in zip(outs["triton"], outs["torch"], strict=True):
        assert ours.token_ids == ref.token_ids
        for got, want in zip(ours.logprobs, ref.logprobs, strict=True):
            assert max(abs(got[t] - want[t]) for t in want) < 1e-4
