"""How far two numerically different bf16 paths of the SAME engine drift apart on random
weights: prefill in one step vs in chunks of 7 tokens (different matmul shapes, so different
rounding), 32 layers, hidden 512, greedy. Runs on the CPU in about a minute:

    python benchmarks/bf16_divergence.py --gain 1.0
    python benchmarks/bf16_divergence.py --gain 0.25   # what init_dummy_weights uses

It shows why "Triton tokens == torch tokens in bf16 on random weights" cannot hold exactly:
one bf16 rounding step anywhere flips near-tied greedy choices later on.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU has no Triton backend

from loraserve.engine.args import EngineArgs  # noqa: E402
from loraserve.model.loader import init_dummy_weights  # noqa: E402
from loraserve.request import SamplingParams  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 4000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 32,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 512,
}


def generate(model_dir: str, gain: float, chunk: int) -> list:
    engine = EngineArgs(
        model=model_dir,
        load_format="dummy",
        dtype="bfloat16",
        device="cpu",
        max_num_batched_tokens=chunk,
    ).create_engine()
    init_dummy_weights(engine.model, seed=0, gain=gain)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1, ignore_eos=True)
    for i in range(8):
        prompt = torch.randint(0, CONFIG["vocab_size"], (32,), generator=g).tolist()
        engine.add_request(prompt, params, request_id=str(i))
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
    return [outs[str(i)] for i in range(8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gain", type=float, default=0.25)
    args = parser.parse_args()
    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    a, b = (generate(model_dir, args.gain, chunk) for chunk in (8192, 7))
    same = sum(
        x == y
        for oa, ob in zip(a, b, strict=True)
        for x, y in zip(oa.token_ids, ob.token_ids, strict=True)
    )
    diff = max(
        abs(oa.logprobs[0][t] - ob.logprobs[0][t])
        for oa, ob in zip(a, b, strict=True)
        for t in oa.logprobs[0]
        if t in ob.logprobs[0]
    )
    print(
        f"gain {args.gain}: greedy tokens equal {same}/{16 * len(a)}, "
        f"largest first-token logprob difference {diff:.4f}"
    )


if __name__ == "__main__":
    main()
