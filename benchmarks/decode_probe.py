"""LoRA's extra decode step time at a given operating point, on dummy weights.

    python benchmarks/decode_probe.py --model llama-7b --points 224x420x224,195x420x195 \
        --ranks 64,32,16,8 --out probe.json

Each point is ROWSxCONTEXTxDISTINCT: a decode batch of ROWS rows of CONTEXT tokens over
DISTINCT adapters (ranks round-robin), timed with and without LoRA on the same engine
(``loraserve.bench.probe``, what ``loraserve bench --decode-probe`` runs after a run).
Prints one JSON line per point.
"""

from __future__ import annotations

import argparse
import json
import time

from loraserve.bench.adapters import register_adapters
from loraserve.bench.probe import PROBE_WARMUP, decode_probe
from loraserve.bench.workload import adapter_name
from loraserve.engine.args import EngineArgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-7b", help="a preset or a model directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--points", default="224x420x224", help="ROWSxCONTEXTxDISTINCT,...")
    parser.add_argument("--ranks", default="64,32,16,8")
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="the engine's max LoRA rank (its page tables' width); default the largest of --ranks",
    )
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--lora-side-stream", action="store_true", help="the engine option")
    parser.add_argument("--no-group-lora-rows", action="store_true", help="the engine option")
    parser.add_argument("--no-lora-fused-decode", action="store_true", help="the engine option")
    parser.add_argument("--lora-fused-max-rank", type=int, default=16, help="the engine option")
    parser.add_argument(
        "--old-grouped-split",
        action="store_true",
        help="grouped decode rows split the shrink's K as before session 14 (two waves, at "
        "most 4 splits), to compare against the current rule on one machine",
    )
    parser.add_argument("--out", default="decode_probe.json")
    args = parser.parse_args()
    if args.old_grouped_split:
        _old_grouped_split()
    points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    start = time.perf_counter()
    engine = EngineArgs(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization,
        # room for the probe's decode slack (bench/probe.py), or it shortens the context
        max_model_len=max(c for _, c, _ in points) + PROBE_WARMUP + args.steps + 129,
        max_lora_rank=args.max_lora_rank or max(ranks),
        max_loras=max(256, max(d for _, _, d in points)),
        max_num_seqs=max(256, max(b for b, _, _ in points)),
        lora_side_stream=args.lora_side_stream,
        group_lora_rows=not args.no_group_lora_rows,
        lora_fused_decode=not args.no_lora_fused_decode,
        lora_fused_max_rank=args.lora_fused_max_rank,
    ).create_engine()
    print(f"engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    register_adapters(engine, max(d for _, _, d in points), ranks, args.targets.split(","))
    results = []
    for rows, context, distinct in points:
        names = [adapter_name(i) for i in range(distinct)]
        t = time.perf_counter()
        result = decode_probe(engine, names, rows, context, steps=args.steps)
        result["seconds"] = time.perf_counter() - t
        graphs = engine.runner.graphs
        result["grouped_steps_so_far"] = graphs.grouped_steps if graphs is not None else 0
        result["small_rank_steps_so_far"] = graphs.small_steps if graphs is not None else 0
        print(json.dumps(result), flush=True)
        results.append(result)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "ranks": ranks, "points": results}, f, indent=1)
    engine.shutdown()


def _old_grouped_split() -> None:
    """Swap kernels.lora's grouped tile rule for session 13's: K split to about two waves,
    at most 4 ways."""
    from loraserve.kernels import lora

    current = lora._grouped_tiles

    def old(r_pad: int, rows: int, in_features: int, n_targets: int, max_out: int, sms: int):
        tiles = current(r_pad, rows, in_features, n_targets, max_out, sms)
        programs = -(-rows // 4) * -(-(n_targets * r_pad) // tiles.block_c)
        split_k = lora._split_k(programs, 2, 4, in_features, tiles.block_k, sms)
        return tiles._replace(split_k=split_k)

    lora._grouped_tiles = old


if __name__ == "__main__":
    main()
