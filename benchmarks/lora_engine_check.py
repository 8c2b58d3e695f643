"""End-to-end multi-LoRA check on a GPU: Llama-7B shape, dummy weights, n random adapters
(ranks round-robin, weights from loraserve.bench.adapters' bank), one batch in which
requests use different adapters.

    python benchmarks/lora_engine_check.py --model llama-7b -n 100 --ranks 8,16,32,64 \
        --batch 64 --prompt-len 128 --new-tokens 64 --targets q_proj,k_proj,v_proj,o_proj

Runs the same requests with the Triton LoRA kernels, with the torch reference path, with
the Triton path and decode steps replayed as CUDA graphs (``triton+graphs``), and with no
adapters at all; prints how many greedy tokens agree (triton vs torch, triton+graphs vs
triton), the largest logprob difference of the first generated token, and tokens/s of each.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from loraserve.bench.adapters import register_adapters
from loraserve.bench.workload import adapter_name
from loraserve.engine.args import EngineArgs
from loraserve.kernels.compiles import compiled_variants, new_variants
from loraserve.model.loader import PRESETS
from loraserve.request import SamplingParams


def build_engine(args: argparse.Namespace, backend: str):
    lora_backend = "triton" if backend == "base" else backend.split("+")[0]
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
        cuda_graph_max_batch=args.batch if backend.endswith("+graphs") else 0,
    ).create_engine()
    register_adapters(engine, args.n, args.ranks, args.targets)
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


def _compare(a, b, lp_a, lp_b) -> dict:
    """Greedy tokens and sequences equal, and the largest first-token logprob difference."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    lp_diff = max(
        abs(la[t] - lb[t]) for la, lb in zip(lp_a, lp_b, strict=True) for t in la if t in lb
    )
    return {
        "tokens_equal": f"{same}/{sum(map(len, a))}",
        "sequences_equal": f"{sum(ra == rb for ra, rb in zip(a, b, strict=True))}/{len(a)}",
        "max_first_logprob_diff": lp_diff,
    }


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
    parser.add_argument("--backends", default="triton,torch,triton+graphs,base")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.targets = args.targets.split(",")
    g = torch.Generator().manual_seed(0)
    vocab = PRESETS[args.model].vocab_size if args.model in PRESETS else 200
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g).tolist()
    adapters = [adapter_name(int(i)) for i in torch.randint(0, args.n, (args.batch,), generator=g)]
    params = SamplingParams(
        max_tokens=args.new_tokens, temperature=0.0, logprobs=1, ignore_eos=True
    )
    results, tokens, first_lp = {}, {}, {}
    for backend in args.backends.split(","):
        engine = build_engine(args, backend)
        warm = SamplingParams(max_tokens=2, ignore_eos=True)
        run(engine, prompts[:2], adapters[:2] if backend != "base" else [None, None], warm)
        compiled0 = compiled_variants()
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
            "graph_steps": engine.runner.graphs.steps if engine.runner.graphs else 0,
            "triton_compiles": new_variants(compiled0, compiled_variants()),
        }
        tokens[backend] = [o.token_ids for o in outs]
        first_lp[backend] = [o.logprobs[0] for o in outs]
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summary = {}
    for x, y in (("triton", "torch"), ("triton+graphs", "triton")):
        if x in tokens and y in tokens:
            summary[f"{x} vs {y}"] = _compare(tokens[x], tokens[y], first_lp[x], first_lp[y])
    if "triton" in tokens and "base" in tokens:
        changed = sum(ra != rc for ra, rc in zip(tokens["triton"], tokens["base"], strict=True))
        summary["sequences_changed_by_their_adapter"] = f"{changed}/{len(prompts)}"
    print(json.dumps(summary))
    for k, r in results.items():
        print(
            f"{k:>13}: {r['tok_per_s']:8.1f} tok/s, {r['ms_per_step']:.2f} ms/step, "
            f"{r['gpu_loads']} adapter loads, {r['graph_steps']} graph steps, "
            f"{sum(r['triton_compiles'].values())} Triton compiles in the timed run"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
