"""Host time of ``ModelRunner.prepare`` for an eager step: building the step's input
tensors (token ids, positions, KV slots, block tables, LoRA segments) and copying them to
the device. Every eager (prefill or mixed) step pays it before its first kernel.

    python benchmarks/prepare_host.py [--decode 255] [--prefill 2x400] [--context 600]

The model is never run, so this works anywhere; on a CPU machine the copies are plain
host copies, on CUDA they go through pinned memory.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from loraserve.engine.runner import ModelRunner
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.pool import PagePool
from loraserve.model.loader import PRESETS
from loraserve.request import Request, SamplingParams

BLOCK = 16


def _request(i: int, prompt_len: int, computed: int, slot: int | None) -> Request:
    rng = random.Random(i)
    r = Request(str(i), [rng.randrange(32000) for _ in range(prompt_len)], SamplingParams())
    r.num_computed_tokens = computed
    r.block_table = [rng.randrange(1 << 14) for _ in range(-(-prompt_len // BLOCK))]
    r.adapter_slot = slot
    return r


def scheduled_batch(decode: int, prefills: list[int], context: int) -> ScheduledBatch:
    batch = ScheduledBatch()
    for i in range(decode):  # contexts of about ``context`` tokens, one new token each
        n = context + i % 64
        batch.add(_request(i, n, n - 1, i % 250), 1)
    for j, n in enumerate(prefills):
        batch.add(_request(decode + j, n, 0, (250 + j) % 256), n)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode", type=int, default=255)
    parser.add_argument("--prefill", default="2x400", help="COUNTxTOKENS")
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    count, tokens = (int(v) for v in args.prefill.split("x"))
    device = torch.device(args.device)
    model = PRESETS["llama-7b"]
    pool = PagePool(8, 1 << 16, torch.float16, device)
    cache = AdapterCache(pool, model, max_loras=256, max_rank=64)
    runner = ModelRunner(None, BLOCK, device, None, adapter_cache=cache)  # type: ignore[arg-type]
    batch = scheduled_batch(args.decode, [tokens] * count, args.context)
    runner.prepare(batch)  # warm up allocators
    start = time.perf_counter()
    for _ in range(args.steps):
        runner.prepare(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = 1e3 * (time.perf_counter() - start) / args.steps
    print(
        f"prepare, {args.decode} decode rows + {count} x {tokens} prefill tokens "
        f"({device.type}): {per_step:.3f} ms per step"
    )


if __name__ == "__main__":
    main()
