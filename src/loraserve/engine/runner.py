"""ModelRunner: turns a scheduled batch into a ForwardBatch, runs the model, samples.

Requests are ordered by adapter slot (base-model requests last), so the token rows of each
adapter form one segment for the LoRA kernels and base-only rows cost them nothing.

A step is split in two: ``launch`` enqueues the forward pass and sampling on the device and
returns at once; ``collect`` reads the sampled tokens back (the step's one device->host
synchronisation). Between the two the engine prefetches adapters for queued requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.engine.graphs import DecodeGraphs
from loraserve.engine.sampler import Sampler, SampleTensors
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.kernels.lora import LoRABatch
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.kv_cache import kv_slot
from loraserve.model.batch import ForwardBatch, LoRAInputs
from loraserve.model.llama import LlamaForCausalLM
from loraserve.request import Request


@dataclass
class PendingStep:
    sampled: list[Request]  # requests that produce a token this step, in batch order
    samples: SampleTensors | None


@dataclass
class StepResult:
    sampled: list[Request]
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        block_size: int,
        device: torch.device,
        sampler: Sampler,
        adapter_cache: AdapterCache | None = None,
        lora_backend: str = "auto",
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.graphs = graphs
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.adapter_cache = adapter_cache
        self.lora_backend = lora_backend

    def prepare(self, scheduled: ScheduledBatch) -> tuple[ForwardBatch, list[Request]]:
        # Decode rows first, then prefill rows; within each, rows of one adapter side by
        # side (adapters first, base-model rows last): each part's LoRA segments are runs
        # of consecutive rows.
        order = sorted(
            range(len(scheduled.requests)),
            key=lambda i: (scheduled.num_scheduled[i] > 1, _slot_key(scheduled.requests[i])),
        )
        requests = [scheduled.requests[i] for i in order]
        counts = [scheduled.num_scheduled[i] for i in order]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start = [0]
        logits_rows: list[int] = []
        sampling: list[Request] = []
        for request, n in zip(requests, counts, strict=True):
            start = request.num_computed_tokens
            end = start + n
            input_ids += request.tokens_slice(start, end)
            positions += range(start, end)
            slots += [kv_slot(request, p, self.block_size) for p in range(start, end)]
            seq_lens.append(end)
            query_start.append(query_start[-1] + n)
            if end == request.num_tokens:
                logits_rows.append(query_start[-1] - 1)
                sampling.append(request)
        max_blocks = max(len(r.block_table) for r in requests)
        tables = [r.block_table + [0] * (max_blocks - len(r.block_table)) for r in requests]
        batch = ForwardBatch(
            input_ids=self._tensor(input_ids, torch.int64),
            positions=self._tensor(positions, torch.int64),
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            query_start_loc=self._tensor(query_start, torch.int32),
            logits_indices=self._tensor(logits_rows, torch.int64),
            max_q_len=max(counts),
            max_seq_len=max(seq_lens),
            lora=self._lora_inputs(requests, query_start),
            num_decode_seqs=sum(n == 1 for n in counts),  # sorted first
        )
        return batch, sampling

    def _lora_inputs(self, requests: list[Request], query_start: list[int]) -> LoRAInputs | None:
        """Single-token rows: one segment each, for the matrix-vector kernels. Longer rows:
        one segment per run of consecutive rows with the same adapter slot, for the tiled
        kernels. A step with both gets both (prepare puts the decode rows first)."""
        decode: tuple[list[int], list[int]] = ([], [])  # (seg_start, seg_slot)
        prefill: tuple[list[int], list[int]] = ([], [])
        ends = [0, 0]
        for i, request in enumerate(requests):
            if request.adapter_slot is None:
                continue  # base-model rows close each part
            start, end = query_start[i], query_start[i + 1]
            part = 0 if end - start == 1 else 1
            seg_start, seg_slot = decode if part == 0 else prefill
            if part == 0 or not seg_slot or seg_slot[-1] != request.adapter_slot:
                seg_start.append(start)
                seg_slot.append(request.adapter_slot)
            ends[part] = end
        metas = [
            self._lora_meta(starts + [end], slots)
            for (starts, slots), end in zip((prefill, decode), ends[::-1], strict=True)
            if slots
        ]
        if not metas:
            return None
        slot_targets = self.adapter_cache.slot_targets
        targets = 0
        for slot in {*decode[1], *prefill[1]}:
            targets |= slot_targets[slot]
        pool = self.adapter_cache.pool.buffer.view(-1)
        second = metas[1] if len(metas) > 1 else None
        return LoRAInputs(pool, metas[0], self.lora_backend, second, targets)

    def _lora_meta(self, seg_start: list[int], seg_slot: list[int]) -> LoRABatch:
        lengths = [b - a for a, b in zip(seg_start, seg_start[1:], strict=False)]
        return self.adapter_cache.lora_batch(
            self._tensor(seg_start, torch.int32), self._tensor(seg_slot, torch.int32), max(lengths)
        )

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    @torch.inference_mode()
    def launch(self, scheduled: ScheduledBatch) -> PendingStep:
        self._wait_for_adapters(scheduled.requests)
        if self.graphs is not None and self.graphs.fits(
            scheduled.requests, scheduled.num_scheduled
        ):
            # Rows of one adapter side by side: their reads of its pages hit in L2.
            requests = sorted(scheduled.requests, key=_slot_key)
            logits = self.graphs.run(requests)
            return PendingStep(requests, self.sampler.launch(logits, requests))
        batch, sampling = self.prepare(scheduled)
        hidden = self.model(batch)
        if not sampling:
            return PendingStep([], None)
        logits = self.model.compute_logits(hidden)
        return PendingStep(sampling, self.sampler.launch(logits, sampling))

    def collect(self, pending: PendingStep) -> StepResult:
        if pending.samples is None:
            return StepResult([], [], [])
        tokens, logprobs = self.sampler.collect(pending.samples, pending.sampled)
        return StepResult(pending.sampled, tokens, logprobs)

    def _wait_for_adapters(self, requests: list[Request]) -> None:
        if self.adapter_cache is None or self.device.type != "cuda":
            return
        # Admission waited for the copies (``is_ready``), so this finds nothing to wait for
        # unless a request was admitted otherwise; it costs no CUDA call per adapter then.
        stream = torch.cuda.current_stream(self.device)
        for name in {r.adapter for r in requests if r.adapter is not None}:
            event = self.adapter_cache.get(name).ready_event
            if event is not None:
                stream.wait_event(event)


def _slot_key(request: Request) -> tuple[int, int]:
    slot = request.adapter_slot
    return (1, 0) if slot is None else (0, slot)
