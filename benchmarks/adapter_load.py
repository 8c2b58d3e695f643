"""How long a cold adapter takes from host memory to the GPU's page pool.

    python benchmarks/adapter_load.py --model llama-7b --ranks 8,16,32,64 --repeat 10

For each rank (q,k,v,o, dummy weights already in host memory), times the three stages:
``pack`` (rows laid out in a pinned buffer as the pages will hold them; runs on the adapter
I/O threads in the engine), ``load`` (the engine thread: pages, tables, copy launches) and
``ready`` (from the start of ``load`` until the side-stream copies have completed), beside a
plain pinned host->device copy of the same bytes. Median of ``--repeat`` loads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loraserve.bench.adapters import AdapterGenerator
from loraserve.bench.workload import adapter_name
from loraserve.engine.args import EngineArgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = args.targets.split(",")
    engine = EngineArgs(
        model=args.model,
        load_format="dummy",
        device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_lora_rank=max(ranks),
        cuda_graph_max_batch=0,
    ).create_engine()
    cache, store = engine.adapter_cache, engine.adapter_store
    gen = AdapterGenerator(engine.config.model, engine.config.dtype, max(ranks), targets)
    cuda = engine.device.type == "cuda"
    results = []
    for rank in ranks:
        times: dict[str, list[float]] = {"pack": [], "load": [], "ready": [], "copy": []}
        for i in range(args.repeat + 1):  # the first is a warm-up
            name = adapter_name(rank * 1000 + i)
            gen.register(engine, name, rank, seed=i)
            weights = store.get(name)
            t0 = time.perf_counter()
            packed = cache.pack(weights)
            t1 = time.perf_counter()
            assert cache.load(packed)
            t2 = time.perf_counter()
            if cuda:
                cache.get(name).ready_event.synchronize()
            t3 = time.perf_counter()
            dtype = engine.config.dtype
            numel = weights.nbytes // dtype.itemsize
            src = torch.empty(numel, dtype=dtype, pin_memory=cuda)
            dst = torch.empty_like(src, device=engine.device)
            if cuda:
                torch.cuda.synchronize()
            t4 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            if cuda:
                torch.cuda.synchronize()
            t5 = time.perf_counter()
            cache.evict(name)
            if i:
                for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t1, t5 - t4), strict=True):
                    times[key].append(1000 * value)
        row = {"rank": rank, "mbytes": weights.nbytes / 1e6}
        row |= {f"{k}_ms": statistics.median(v) for k, v in times.items() if v}
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
