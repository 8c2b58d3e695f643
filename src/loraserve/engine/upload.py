"""Upload: a step's small host arrays to the device in one copy per dtype.

An eager step has about a dozen input arrays (token ids, positions, KV slots, block
tables, LoRA segments). Copying each from its own freshly pinned buffer costs a pinning
call and a copy launch apiece (~100 us each on an H200 host); here they are packed into one
reused pinned buffer per dtype and sent with one copy, and the device tensors are views of
that copy. On the CPU the views share one fresh tensor per dtype (no copy at all).

Every view starts on a 16-byte boundary: Triton specialises each pointer argument on
16-byte alignment, so views at offsets that depend on the batch's sizes would make the
kernels that read them (attention, LoRA) compile new variants in the middle of serving (38
in one S-LoRA run on the H200, docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import torch

_TORCH = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}
ALIGN_BYTES = 16  # Triton's pointer specialisation (tt.divisibility)


def _offsets(sizes: list[int], itemsize: int) -> tuple[list[int], int]:
    """Element offsets of the parts, each rounded up to ALIGN_BYTES; and the total."""
    step = ALIGN_BYTES // itemsize
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // step) * step
    return offsets, end


class Upload:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: dict[torch.dtype, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None  # the latest copy out of the buffers

    def __call__(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Device tensors with the arrays' shapes and dtypes (int64 or int32), in order.
        They are views of one tensor per dtype: treat them as read-only."""
        if any(a.dtype not in _TORCH for a in arrays):
            bad = sorted({str(a.dtype) for a in arrays if a.dtype not in _TORCH})
            raise TypeError(f"upload takes int64 and int32 arrays, got {bad}")
        out: list[torch.Tensor | None] = [None] * len(arrays)
        if self._copied is not None:
            self._copied.synchronize()  # the buffers are free again (the step has long ended)
        for np_dtype, dtype in _TORCH.items():
            index = [i for i, a in enumerate(arrays) if a.dtype == np_dtype]
            if not index:
                continue
            sizes = [arrays[i].size for i in index]
            offsets, total = _offsets(sizes, np_dtype.itemsize)
            parts = [(arrays[i], o) for i, o in zip(index, offsets, strict=True)]
            flat = self._flat(dtype, total, parts)
            for i, o, n in zip(index, offsets, sizes, strict=True):
                out[i] = flat[o : o + n].view(arrays[i].shape)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return out  # type: ignore[return-value]

    def _flat(
        self, dtype: torch.dtype, total: int, parts: list[tuple[np.ndarray, int]]
    ) -> torch.Tensor:
        """One tensor holding every (array, element offset) part, on the device."""
        if self.device.type != "cuda":
            host = torch.empty(total, dtype=dtype)  # torch's allocator aligns its start
            _fill(host.numpy(), parts)
            return host.to(self.device)
        buf = self._pinned.get(dtype)
        if buf is None or buf.numel() < total:
            buf = torch.empty(
                max(total, 2 * (0 if buf is None else buf.numel()), 1 << 14),
                dtype=dtype,
                pin_memory=True,
            )
            self._pinned[dtype] = buf
        host = buf[:total]
        _fill(host.numpy(), parts)
        return host.to(self.device, non_blocking=True)


def _fill(flat: np.ndarray, parts: list[tuple[np.ndarray, int]]) -> None:
    for array, offset in parts:
        flat[offset : offset + array.size] = array.ravel()
