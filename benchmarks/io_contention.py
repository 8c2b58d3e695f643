"""How much the adapter I/O threads slow the engine thread's host work.

At S2 n=2000 the engine generates and packs an adapter every ~0.1 s on background threads
while the engine thread builds and launches eager (prefill/mixed) steps, thousands of
Python-level calls each. Both need the GIL (and the CPU). This measures the engine-side
work alone, then while the I/O threads pack S2-shaped (Llama-7B, ranks 64/32/16/8, q,k,v,o)
adapters back to back, as at saturation:

    python benchmarks/io_contention.py [--adapters 16] [--threads N]

``--source file`` reads PEFT safetensors directories (written once, then in the page cache)
instead of generating adapters.

Engine-side work, per "step": ``ModelRunner.prepare`` of a mixed batch (255 decode rows +
2 x 400 prompt tokens) and 128 ``lora_apply`` wrapper calls with the kernels replaced by
no-ops (32 layers x (q|k|v, o) x (decode, prefill) segments). No GPU is needed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import loraserve.kernels.lora as lora
from loraserve.adapters.peft import make_random_adapter
from loraserve.adapters.store import AdapterStore
from loraserve.bench.adapters import AdapterGenerator
from loraserve.engine.adapters import IO_THREADS, AdapterManager, _one_cpu_thread
from loraserve.engine.runner import ModelRunner
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.pool import PagePool
from loraserve.model.loader import PRESETS

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def _engine_step_work(runner: ModelRunner, batch, lora_calls) -> None:
    inputs = runner.prepare(batch)[0].lora
    for x, y, slices in lora_calls:
        for meta in (inputs.meta, inputs.decode):
            lora.lora_apply(x, y, inputs.pool, meta, 3, 0, slices, backend="triton")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=16, help="adapters packed meanwhile")
    parser.add_argument("--threads", type=int, default=IO_THREADS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch default")
    parser.add_argument(
        "--io-all-cores",
        action="store_true",
        help="I/O threads' torch ops on every core (the engine runs them on one each)",
    )
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval (s)"
    )
    parser.add_argument(
        "--source",
        choices=("bank", "file"),
        default="bank",
        help="generated adapters (the bench's) or PEFT safetensors directories read from disk",
    )
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    # Scripts beside this one.
    from lora_host_overhead import disable_lora_launches  # noqa: PLC0415
    from prepare_host import BLOCK, scheduled_batch  # noqa: PLC0415

    disable_lora_launches()

    model = PRESETS["llama-7b"]
    dtype = torch.float16
    pool = PagePool(8, 1 << 16, dtype, "cpu")
    cache = AdapterCache(pool, model, max_loras=256, max_rank=64)
    runner = ModelRunner(None, BLOCK, torch.device("cpu"), None, adapter_cache=cache)  # type: ignore[arg-type]
    batch = scheduled_batch(255, [400, 400], 600)
    x, y = torch.zeros(1, 4096, dtype=dtype), torch.zeros(1, 3 * 4096, dtype=dtype)
    qkv = (x, y, [(0, 4096), (4096, 4096), (8192, 4096)])
    o = (x, y[:, :4096], [(0, 4096)])
    calls = [qkv, o] * 32

    store = AdapterStore(model, dtype, host_budget_bytes=0)
    names = [f"a{i}" for i in range(args.adapters)]
    if args.source == "file":  # PEFT directories on disk (page cache), written once
        tmp = tempfile.TemporaryDirectory()
        for i, name in enumerate(names):
            rank = (64, 32, 16, 8)[i % 4]
            store.register(
                name, make_random_adapter(Path(tmp.name, name), model, rank, QKVO, i, dtype=dtype)
            )
    else:
        generator = AdapterGenerator(model, dtype, 64, QKVO)
        for i, name in enumerate(names):
            generator.register_with_store(store, name, (64, 32, 16, 8)[i % 4], seed=i)
        generator.bank._get()  # made once per process: not part of the per-adapter cost
    manager = AdapterManager(store, cache, background=False)

    def step_times(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            _engine_step_work(runner, batch, calls)
            times.append(time.perf_counter() - start)
        return times

    step_times(3)  # warm up
    alone = statistics.median(step_times(args.steps))
    done = threading.Event()
    packed = []

    def pack(name: str) -> None:
        start = time.perf_counter()
        p = manager._pack(name)
        packed.append(time.perf_counter() - start)
        cache.discard(p)

    init = None if args.io_all_cores else _one_cpu_thread  # as the engine's I/O threads
    with ThreadPoolExecutor(args.threads, initializer=init) as pool_threads:
        futures = [pool_threads.submit(pack, n) for n in names]
        contended = []
        while not all(f.done() for f in futures):
            contended += step_times(1)
        for f in futures:
            f.result()
    done.set()
    busy = statistics.median(contended) if contended else float("nan")
    print(
        f"engine-side host work per mixed step: {1e3 * alone:.2f} ms alone, "
        f"{1e3 * busy:.2f} ms (median of {len(contended)}) while {args.threads} I/O threads "
        f"packed {len(names)} S2 adapters ({1e3 * statistics.median(packed):.0f} ms each, "
        f"median); slowdown {busy / alone:.2f}x"
    )


if __name__ == "__main__":
    main()
