"""ModelRunner: turns a scheduled batch into a ForwardBatch, runs the model, samples.

Host-side metadata is built in Python lists and moved to the device in one go; the only
device->host synchronisation of a step is reading the sampled tokens (and logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.engine.sampler import Sampler, SampleResult
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.model.batch import ForwardBatch
from loraserve.model.llama import LlamaForCausalLM
from loraserve.request import Request


@dataclass
class StepResult:
    sampled: list[Request]  # requests that produced a token this step, in batch order
    samples: SampleResult


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        block_size: int,
        device: torch.device,
        sampler: Sampler,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = sampler

    def prepare(self, scheduled: ScheduledBatch) -> tuple[ForwardBatch, list[Request]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start = [0]
        logits_rows: list[int] = []
        sampling: list[Request] = []
        for request, n in zip(scheduled.requests, scheduled.num_scheduled, strict=True):
            start = request.num_computed_tokens
            end = start + n
            input_ids += request.tokens_slice(start, end)
            positions += range(start, end)
            slots += [self._slot(request, p) for p in range(start, end)]
            seq_lens.append(end)
            query_start.append(query_start[-1] + n)
            if end == request.num_tokens:
                logits_rows.append(query_start[-1] - 1)
                sampling.append(request)
        max_blocks = max(len(r.block_table) for r in scheduled.requests)
        tables = [
            r.block_table + [0] * (max_blocks - len(r.block_table)) for r in scheduled.requests
        ]
        batch = ForwardBatch(
            input_ids=self._tensor(input_ids, torch.int64),
            positions=self._tensor(positions, torch.int64),
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            query_start_loc=self._tensor(query_start, torch.int32),
            logits_indices=self._tensor(logits_rows, torch.int64),
            max_q_len=max(scheduled.num_scheduled),
            max_seq_len=max(seq_lens),
        )
        return batch, sampling

    def _slot(self, request: Request, position: int) -> int:
        page = request.block_table[position // self.block_size]
        return page * self.block_size + position % self.block_size

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    @torch.inference_mode()
    def step(self, scheduled: ScheduledBatch) -> StepResult:
        batch, sampling = self.prepare(scheduled)
        hidden = self.model(batch)
        if not sampling:
            return StepResult([], SampleResult([], []))
        logits = self.model.compute_logits(hidden)
        return StepResult(sampling, self.sampler(logits, sampling))
