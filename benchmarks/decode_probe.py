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
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--lora-side-stream", action="store_true", help="the engine option")
    parser.add_argument("--out", default="decode_probe.json")
    args = parser.parse_args()
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
        max_lora_rank=max(ranks),
        max_loras=max(256, max(d for _, _, d in points)),
        max_num_seqs=max(256, max(b for b, _, _ in points)),
        lora_side_stream=args.lora_side_stream,
    ).create_engine()
    print(f"engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    register_adapters(engine, max(d for _, _, d in points), ranks, args.targets.split(","))
    results = []
    for rows, context, distinct in points:
        names = [adapter_name(i) for i in range(distinct)]
        t = time.perf_counter()
        result = decode_probe(engine, names, rows, context, steps=args.steps)
        result["seconds"] = time.perf_counter() - t
        print(json.dumps(result), flush=True)
        results.append(result)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "ranks": ranks, "points": results}, f, indent=1)
    engine.shutdown()


if __name__ == "__main__":
    main()
