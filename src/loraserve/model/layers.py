"""Building blocks of the Llama-family model: packed linear layers and RMSNorm
(with the residual add fused in).

A ``PackedLinear`` stores several checkpoint projections that read the same input as one
weight (q|k|v, gate|up), so the base matmul is one dense GEMM. Each projection keeps its
name and output range: that is where a LoRA target attaches (one A per target, the input
read once) and how checkpoint tensors are loaded into the packed weight.

LoRA is part of the layer: given the step's LoRAInputs, the layer adds
``scaling * (x A^T) B^T`` of each token's adapter to the output slices of the targets that
adapter has, reading A and B straight from the page pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.config import LORA_TARGETS, target_mask
from loraserve.kernels.fused import fused_add_rms_norm
from loraserve.kernels.lora import lora_apply, lora_triton_launches

if TYPE_CHECKING:
    from loraserve.model.batch import LoRAInputs


class PackedLinear(nn.Module):
    """y = x W^T (+ b), W packed from named projections along the output dimension.

    weight [sum(out_sizes), in_features]; projection ``name`` owns rows
    ``offsets[name] : offsets[name] + sizes[name]``.
    """

    def __init__(
        self,
        in_features: int,
        projections: dict[str, int],
        bias: bool = False,
        layer: int = 0,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.first_target = LORA_TARGETS.index(next(iter(projections)))
        self.target_mask = target_mask(projections)
        self.in_features = in_features
        self.sizes = dict(projections)
        self.offsets: dict[str, int] = {}
        total = 0
        for name, size in projections.items():
            self.offsets[name] = total
            total += size
        self.out_features = total
        self.out_slices = [(self.offsets[n], self.sizes[n]) for n in projections]
        self.weight = nn.Parameter(torch.empty(total, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(total), requires_grad=False) if bias else None
        # A second CUDA stream for the LoRA shrink beside the base GEMM (lora_side_stream).
        self.lora_stream: torch.cuda.Stream | None = None

    def load(self, projection: str, param: str, tensor: torch.Tensor) -> None:
        """Copy a checkpoint tensor (``param`` = "weight" | "bias") into its slice."""
        start, size = self.offsets[projection], self.sizes[projection]
        target = getattr(self, param)
        if target is None:
            raise ValueError(f"{projection} has no {param} in this architecture")
        expected = (size, *target.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{projection}.{param}: checkpoint shape {tuple(tensor.shape)}, expected {expected}"
            )
        target.data[start : start + size].copy_(tensor)

    def forward(self, x: torch.Tensor, lora: LoRAInputs | None = None) -> torch.Tensor:
        # x [T, in_features] -> [T, out_features]
        if lora is None or not lora.targets & self.target_mask:
            return F.linear(x, self.weight, self.bias)
        if self.lora_stream is not None and x.is_cuda and lora.backend in ("auto", "triton"):
            return self._forward_side_stream(x, lora, self.lora_stream)
        y = F.linear(x, self.weight, self.bias)
        for meta in lora.metas:
            lora_apply(
                x,
                y,
                lora.pool,
                meta,
                self.layer,
                self.first_target,
                self.out_slices,
                backend=lora.backend,
            )
        return y

    def _forward_side_stream(
        self, x: torch.Tensor, lora: LoRAInputs, side: torch.cuda.Stream
    ) -> torch.Tensor:
        """The LoRA shrink (it reads only x) on ``side`` while the base GEMM runs here; the
        expand adds into y after both. Its scratch is made on this stream before the fork,
        so freeing it here needs no record_stream; a CUDA graph captures the fork and join."""
        launches = [
            lora_triton_launches(x, lora.pool, meta, self.layer, self.first_target, self.out_slices)
            for meta in lora.metas
            if meta.num_segments
        ]
        main = torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for shrink, _ in launches:
                shrink()
        y = F.linear(x, self.weight, self.bias)
        main.wait_stream(side)
        for _, expand in launches:
            expand(y)
        return y


class RMSNorm(nn.Module):
    """HF Llama's RMSNorm (normalise in fp32, cast back, then scale), with the residual add
    before it fused in: ``norm(x, residual) -> (RMSNorm(x + residual), x + residual)``."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.backend = "auto"  # of fused_add_rms_norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual [T, hidden] -> normalised [T, hidden], x + residual [T, hidden]
        return fused_add_rms_norm(x, residual, self.weight, self.eps, backend=self.backend)
