"""Offline throughput of the engine on dummy weights, with HF generate beside it.

    python benchmarks/engine_throughput.py --model llama-7b --batch 32 --prompt-len 256 \
        --new-tokens 128 --backends triton,torch --hf --out results.json

Prints tokens/s for each attention backend and for HF transformers' generate on the same
shape (ANCHORS.md measured HF at 454 tok/s for this shape on an H200), and how many greedy
tokens the backends agree on (random weights make near-ties, so a few may differ).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from loraserve.engine.args import EngineArgs
from loraserve.model.loader import PRESETS
from loraserve.request import SamplingParams


def run_engine(args: argparse.Namespace, backend: str, prompts: list[list[int]]) -> dict:
    engine = EngineArgs(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        attention_backend=backend.split("+")[0],
        cuda_graph_max_batch=args.batch if "+graphs" in backend else 0,
        overlap_steps="+nooverlap" not in backend,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.prompt_len + args.new_tokens + 16,
    ).create_engine()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    _generate(engine, prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs, steps = _generate(engine, prompts, params)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs.values())
    result = {
        "backend": backend,
        "seconds": elapsed,
        "generated_tokens": tokens,
        "tok_per_s": tokens / elapsed,
        "steps": steps,
        "ms_per_step": 1000 * elapsed / steps,
        "pool_pages": engine.pool.num_pages,
        "page_mib": engine.pool.page_bytes / 2**20,
        "tokens": [outs[str(i)].token_ids for i in range(len(prompts))],
    }
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _generate(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    outs, steps = {}, 0
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
        steps += 1
    return outs, steps


def run_hf(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import transformers

    mc = PRESETS[args.model]
    config = transformers.LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers,
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads,
        max_position_embeddings=4096,
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.tensor(prompts, device="cuda")
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    model.generate(ids[:2, :16], max_new_tokens=4, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = args.new_tokens * len(prompts)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"backend": "hf-generate", "seconds": elapsed, "tok_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-7b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--backends",
        default="triton,torch",
        help="attention backends to run; 'triton+graphs' also replays decode as CUDA graphs "
        "(overlapped steps; '+nooverlap' without)",
    )
    parser.add_argument("--hf", action="store_true", help="also time HF generate")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    vocab = PRESETS[args.model].vocab_size
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g).tolist()
    results = [run_engine(args, b, prompts) for b in args.backends.split(",")]
    if len(results) > 1:
        a, b = results[0]["tokens"], results[1]["tokens"]
        same = sum(
            x == y for ra, rb in zip(a, b, strict=False) for x, y in zip(ra, rb, strict=False)
        )
        print(
            f"greedy tokens equal between {results[0]['backend']} and {results[1]['backend']}: "
            f"{same}/{sum(map(len, a))}; sequences fully equal: "
            f"{sum(ra == rb for ra, rb in zip(a, b, strict=False))}/{len(a)}"
        )
    if args.hf:
        results.append(run_hf(args, prompts))
    for r in results:
        r.pop("tokens", None)
        print(
            f"{r['backend']:>12}: {r['tok_per_s']:9.1f} tok/s  ({r['seconds']:.2f} s"
            + (f", {r['ms_per_step']:.2f} ms/step)" if "ms_per_step" in r else ")")
        )
    if args.out:
        with open(args.out, "w") as f:
            record = {"args": vars(args), "device": torch.cuda.get_device_name()}
            json.dump({**record, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
