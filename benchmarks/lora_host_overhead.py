"""Host time of one ``lora_apply`` call (Triton backend) without its kernels: the Python
wrapper work (checks, tile choice, scratch allocation, argument building) that every eager
step pays 4 x num_layers times (twice in a mixed step), on top of Triton's own launch cost.

    python benchmarks/lora_host_overhead.py

The kernels are replaced by no-ops, so this runs anywhere (CPU tensors); on a GPU the
scratch allocation is a CUDA caching-allocator call instead of a CPU one.
"""

from __future__ import annotations

import time

import torch

import loraserve.kernels.lora as lora


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def disable_lora_launches() -> None:
    """Replace the LoRA kernels by no-ops: calls then cost only their host work."""
    for name in (
        "_shrink_decode_kernel",
        "_shrink_prefill_kernel",
        "_expand_decode_kernel",
        "_expand_prefill_kernel",
    ):
        setattr(lora, name, _NoLaunch())


def main() -> None:
    disable_lora_launches()
    slots, layers, rank = 8, 32, 64
    tables = dict(
        row_offsets=torch.zeros(slots, layers, 7, 2, rank, dtype=torch.int64),
        ranks=torch.full((slots, layers, 7), 16, dtype=torch.int32),
        scalings=torch.ones(slots, layers, 7),
    )
    pool = torch.zeros(1 << 20)
    slices = [(0, 4096), (4096, 4096), (8192, 4096)]  # q|k|v of Llama-7B
    for label, rows, segments, seg_len in (
        ("decode, 256 rows", 256, 256, 1),
        ("prefill, 8 x 256 rows", 2048, 8, 256),
    ):
        batch = lora.LoRABatch(
            seg_start=torch.arange(segments + 1, dtype=torch.int32) * seg_len,
            seg_slot=torch.zeros(segments, dtype=torch.int32),
            max_rank=rank,
            max_seg_len=seg_len,
            num_segments=segments,
            row_align=8,
            **tables,
        )
        x, y = torch.zeros(rows, 4096), torch.zeros(rows, 3 * 4096)
        calls = 5000
        start = time.perf_counter()
        for _ in range(calls):
            lora.lora_apply(x, y, pool, batch, 3, 0, slices, backend="triton")
        per_call = 1e6 * (time.perf_counter() - start) / calls
        print(f"{label}: {per_call:.1f} us per lora_apply (kernels not launched)")


if __name__ == "__main__":
    main()
