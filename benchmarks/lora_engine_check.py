"""End-to-end multi-LoRA check on a GPU: Llama-7B shape, dummy weights, n random adapters
(ranks round-robin), one batch in which requests use different adapters.

    python benchmarks/lora_engine_check.py --model llama-7b -n 100 --ranks 8,16,32,64 \
        --batch 64 --prompt-len 128 --new-tokens 64 --targets q_proj,k_proj,v_proj,o_proj

Runs the same requests with the Triton LoRA kernels and with the torch reference path, and
with no adapters at all; prints how many greedy tokens agree, the largest logprob
difference of the first generated token, and tokens/s of each run.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from loraserve.adapters.peft import random_lora_weights
from loraserve.engine.args import EngineArgs
from loraserve.model.loader import PRESETS
from loraserve.request import SamplingParams


def build_engine(args: argparse.Namespace, lora_backend: str):
    engine = EngineArgs(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        device=args.device,
        lora_backend=lora_backend,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.prompt_len + args.new_tokens + 16,
        max_lora_rank=max(args.ranks),
        max_loras=max(args.batch, 8),
    ).create_engine()
    config = engine.config.model
    for i in range(args.n):
        rank = args.ranks[i % len(args.ranks)]
        name = f"adapter-{i}"

        def make(name=name, rank=rank, seed=i):
            return random_lora_weights(
                name, config, rank, args.targets, seed, dtype=engine.config.dtype
            )

        nbytes = (
            sum(
                rank * sum(config.lora_shape(t)) * engine.pool.buffer.element_size()
                for t in args.targets
            )
            * config.num_hidden_layers
        )
        engine.adapter_store.register_generated(name, make, nbytes)
    return engine


def run(engine, prompts, adapters, params):
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(p, params, request_id=str(i), adapter=a)
    outs, steps = {}, 0
    _sync()
    start = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
        steps += 1
    _sync()
    elapsed = time.perf_counter() - start
    return [outs[str(i)] for i in range(len(prompts))], elapsed, steps


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-7b", help="a preset or a model directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.targets = args.targets.split(",")
    g = torch.Generator().manual_seed(0)
    vocab = PRESETS[args.model].vocab_size if args.model in PRESETS else 200
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g).tolist()
    adapters = [f"adapter-{int(i)}" for i in torch.randint(0, args.n, (args.batch,), generator=g)]
    params = SamplingParams(
        max_tokens=args.new_tokens, temperature=0.0, logprobs=1, ignore_eos=True
    )
    results, tokens, first_lp = {}, {}, {}
    for backend in ("triton", "torch", "base"):
        engine = build_engine(args, "triton" if backend == "base" else backend)
        warm = SamplingParams(max_tokens=2, ignore_eos=True)
        run(engine, prompts[:2], adapters[:2] if backend != "base" else [None, None], warm)
        outs, elapsed, steps = run(
            engine, prompts, adapters if backend != "base" else [None] * len(prompts), params
        )
        n_tokens = sum(len(o.token_ids) for o in outs)
        stats = engine.adapter_cache.stats
        results[backend] = {
            "seconds": elapsed,
            "tok_per_s": n_tokens / elapsed,
            "ms_per_step": 1000 * elapsed / steps,
            "gpu_loads": stats.gpu_loads,
            "distinct_adapters": len(set(adapters)) if backend != "base" else 0,
        }
        tokens[backend] = [o.token_ids for o in outs]
        first_lp[backend] = [o.logprobs[0] for o in outs]
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    a, b = tokens["triton"], tokens["torch"]
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    seq_same = sum(ra == rb for ra, rb in zip(a, b, strict=True))
    lp_diff = max(
        abs(la[t] - lb[t])
        for la, lb in zip(first_lp["triton"], first_lp["torch"], strict=True)
        for t in la
        if t in lb
    )
    differs_from_base = sum(ra != rc for ra, rc in zip(a, tokens["base"], strict=True))
    summary = {
        "tokens_equal": f"{same}/{sum(map(len, a))}",
        "sequences_equal": f"{seq_same}/{len(a)}",
        "max_first_logprob_diff": lp_diff,
        "sequences_changed_by_their_adapter": f"{differs_from_base}/{len(a)}",
    }
    print(json.dumps(summary))
    for k, r in results.items():
        print(
            f"{k:>7}: {r['tok_per_s']:8.1f} tok/s, {r['ms_per_step']:.2f} ms/step, "
            f"{r['gpu_loads']} adapter loads"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
