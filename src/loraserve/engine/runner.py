"""ModelRunner: turns a scheduled batch into a ForwardBatch, runs the model, samples.

Requests are ordered by adapter slot (base-model requests last), so the token rows of each
adapter form one segment for the LoRA kernels and base-only rows cost them nothing.

A step is split in two: ``launch`` enqueues the forward pass and sampling on the device and
returns at once; ``collect`` reads the sampled tokens back (the step's one device->host
synchronisation). Between the two the engine prefetches adapters for queued requests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from loraserve.engine.graphs import DecodeGraphs, is_decode_row
from loraserve.engine.prefill_graphs import PrefillGraphs
from loraserve.engine.sampler import Sampler, SampleTensors
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.engine.upload import Upload
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.model.batch import ForwardBatch, LoRAInputs
from loraserve.model.llama import LlamaForCausalLM
from loraserve.request import Request


@dataclass
class PendingStep:
    sampled: list[Request]  # requests that produce a token this step, in batch order
    samples: SampleTensors | None
    # With LLMEngine.time_device: timing events recorded on the stream before and after
    # the step's work (the first completes when the device reaches the step).
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None


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
        mixed_decode_graphs: int = 0,
        prefill_graphs: PrefillGraphs | None = None,
    ) -> None:
        self.graphs = graphs
        # Prompt rows of up to MAX_SEQS sequences as a graph replay (after the decode rows'
        # graph replay, if any): a step then makes no eager launches at all.
        self.prefill_graphs = prefill_graphs
        # In a step that also prefills, decode rows replay the decode graphs (and the prompt
        # rows run eagerly after them) when there are at least this many; 0: never.
        self.mixed_decode_graphs = mixed_decode_graphs
        self.eager_passes = 0  # forward passes launched eagerly (not as graph replays)
        self.prompt_steps = 0  # steps launched with prompt rows (tokens of a prefill)
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.adapter_cache = adapter_cache
        self.lora_backend = lora_backend
        self.upload = Upload(device)

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
        query_start = list(itertools.accumulate(counts, initial=0))
        tables = np.zeros((len(requests), max(len(r.block_table) for r in requests)), np.int32)
        positions = np.empty(query_start[-1], np.int64)
        input_ids: list[int] = []
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        sampling: list[Request] = []
        for i, (request, n) in enumerate(zip(requests, counts, strict=True)):
            start = request.num_computed_tokens
            end = start + n
            table = request.block_table
            tables[i, : len(table)] = table
            input_ids += request.tokens_slice(start, end)
            if n == 1:
                positions[query_start[i]] = start
            else:
                positions[query_start[i] : query_start[i + 1]] = np.arange(start, end)
            seq_lens.append(end)
            if end == request.num_tokens:
                logits_rows.append(query_start[i + 1] - 1)
                sampling.append(request)
        # Every token's KV slot: its page (from its sequence's block table) and offset.
        rows = np.repeat(np.arange(len(requests)), counts)
        pages = tables[rows, positions // self.block_size].astype(np.int64)
        slots = pages * self.block_size + positions % self.block_size
        segments = self._lora_segments(requests, query_start)
        arrays = [
            np.array(input_ids, np.int64),
            positions,
            slots,
            tables,
            np.array(seq_lens, np.int32),
            np.array(query_start, np.int32),
            np.array(logits_rows, np.int64),
            *(np.array(v, np.int32) for part in segments for v in part),
        ]
        d = sum(n == 1 for n in counts)  # decode rows, sorted first
        mixed = 0 < d < len(requests)
        if mixed:  # the prefill part's attention inputs, aligned (ForwardBatch.prefill_part)
            arrays += [tables[d:], arrays[4][d:], arrays[5][d:]]
        ids, pos, slot, table, lens, starts, logits, *lora = self.upload(arrays)
        prefill_part = tuple(lora[-3:]) if mixed else None
        if mixed:
            lora = lora[:-3]
        batch = ForwardBatch(
            input_ids=ids,
            positions=pos,
            slot_mapping=slot,
            block_tables=table,
            seq_lens=lens,
            query_start_loc=starts,
            logits_indices=logits,
            max_q_len=max(counts),
            max_seq_len=max(seq_lens),
            lora=self._lora_inputs(segments, lora),
            num_decode_seqs=d,
            prefill_part=prefill_part,
        )
        return batch, sampling

    def _lora_segments(
        self, requests: list[Request], query_start: list[int]
    ) -> list[tuple[list[int], list[int]]]:
        """(seg_start, seg_slot) of the step's LoRA parts, prefill rows' part first.

        Single-token rows: one segment each, for the matrix-vector kernels. Longer rows: one
        segment per run of consecutive rows with the same adapter slot, for the tiled
        kernels. A step with both gets both (prepare puts the decode rows first)."""
        decode: tuple[list[int], list[int]] = ([], [])
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
        return [
            (starts + [end], slots)
            for (starts, slots), end in zip((prefill, decode), ends[::-1], strict=True)
            if slots
        ]

    def _lora_inputs(
        self, segments: list[tuple[list[int], list[int]]], tensors: list[torch.Tensor]
    ) -> LoRAInputs | None:
        """The step's LoRA inputs from its segments (host lists) and their device copies."""
        if not segments:
            return None
        metas = []
        targets = 0
        cache = self.adapter_cache
        slot_targets = cache.slot_targets
        for k, (seg_start, seg_slot) in enumerate(segments):
            longest = max(b - a for a, b in zip(seg_start, seg_start[1:], strict=False))
            starts, slots = tensors[2 * k], tensors[2 * k + 1]
            # tiles for the part's own ranks where the tables are wider
            width = cache.width_for(seg_slot)
            metas.append(cache.lora_batch(starts, slots, longest, width))
            for slot in set(seg_slot):
                targets |= slot_targets[slot]
        pool = cache.pool.buffer.view(-1)
        second = metas[1] if len(metas) > 1 else None
        return LoRAInputs(pool, metas[0], self.lora_backend, second, targets)

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
        split = self._split_decode(scheduled)
        if split is not None:
            return self._launch_split(*split)
        self.eager_passes += 1
        self.prompt_steps += not all(
            is_decode_row(r, n)
            for r, n in zip(scheduled.requests, scheduled.num_scheduled, strict=True)
        )
        batch, sampling = self.prepare(scheduled)
        hidden = self.model(batch)
        if not sampling:
            return PendingStep([], None)
        logits = self.model.compute_logits(hidden)
        return PendingStep(sampling, self.sampler.launch(logits, sampling))

    def _split_decode(
        self, scheduled: ScheduledBatch
    ) -> tuple[list[Request], ScheduledBatch, list[list[int]] | None] | None:
        """(decode requests, the rest, the rest's prefill-graph replays) when this step's
        decode rows should replay the decode graphs apart from its prompt rows: always when
        the prompt rows fit the prefill graphs (the replays: groups of indices into the
        rest, in adapter order), else (replays None: the prompt rows run eagerly) when there
        are at least ``mixed_decode_graphs`` decode rows. None: one eager pass over every
        row."""
        if self.graphs is None:
            return None
        decode, rest = self._partition(scheduled)
        if not rest.requests or not self.fits_graphs(len(decode)):
            return None
        replays = self._replays(rest)
        if replays is not None:
            return decode, rest, replays
        if self.mixed_decode_graphs <= 0 or len(decode) < self.mixed_decode_graphs:
            return None
        return decode, rest, None

    @staticmethod
    def _partition(scheduled: ScheduledBatch) -> tuple[list[Request], ScheduledBatch]:
        """(the decode rows' requests, the rest): rows a decode graph can take apart."""
        decode, rest = [], ScheduledBatch()
        for r, n in zip(scheduled.requests, scheduled.num_scheduled, strict=True):
            if is_decode_row(r, n):
                decode.append(r)
            else:
                rest.add(r, n)
        return decode, rest

    def _launch_split(
        self, decode: list[Request], rest: ScheduledBatch, replays: list[list[int]] | None
    ) -> PendingStep:
        """The decode rows (if any) as one decode graph replay, then the prompt rows: as
        prefill graph replays (``replays``: no eager launch in the step), or eagerly (a
        second read of the weights, against an eager pass over every decode row: its kernel
        launches, its LoRA in the eager kernels)."""
        decode = sorted(decode, key=_slot_key)
        parts = [self.graphs.run(decode)] if decode else []
        return self._with_prompts(parts, decode, rest, replays)

    def _with_prompts(
        self,
        parts: list[torch.Tensor],
        sampled: list[Request],
        rest: ScheduledBatch,
        replays: list[list[int]] | None,
    ) -> PendingStep:
        """Launch the prompt rows ``rest`` after the decode part (``parts``: its logits, for
        ``sampled``) and sample the step."""
        sampled = list(sampled)
        self.prompt_steps += bool(rest.requests)
        if replays is not None:
            for group in replays:
                logits, sampling = self.prefill_graphs.run(
                    [rest.requests[i] for i in group], [rest.num_scheduled[i] for i in group]
                )
                if sampling:
                    # A later replay of the same bucket overwrites its output buffer.
                    parts.append(logits.clone() if len(replays) > 1 else logits)
                    sampled += sampling
        elif rest.requests:
            self.eager_passes += 1
            batch, sampling = self.prepare(rest)
            hidden = self.model(batch)
            if sampling:
                parts.append(self.model.compute_logits(hidden))
                sampled += sampling
        if not sampled:
            return PendingStep([], None)
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        return PendingStep(sampled, self.sampler.launch(logits, sampled))

    def _replays(self, rest: ScheduledBatch) -> list[list[int]] | None:
        """``rest``'s prompt rows as prefill-graph replays (index groups in adapter order),
        or None when they run eagerly."""
        if self.prefill_graphs is None:
            return None
        order = sorted(range(len(rest.requests)), key=lambda i: _slot_key(rest.requests[i]))
        groups = self.prefill_graphs.groups([rest.num_scheduled[i] for i in order])
        return None if groups is None else [[order[i] for i in group] for group in groups]

    @torch.inference_mode()
    def launch_next(
        self,
        pending: PendingStep,
        requests: list[Request],
        prompts: ScheduledBatch | None = None,
    ) -> PendingStep:
        """Enqueue a graphed decode step after ``pending`` (any step not yet collected) for
        ``requests``, some of the requests it samples: each one's input is the token
        ``pending`` samples for it, read on the device. Their block tables must already
        cover it. ``prompts``: newly admitted prompt rows launched after them (prefill
        graphs, else eagerly: their inputs do not depend on ``pending``)."""
        assert self.graphs is not None and pending.samples is not None
        parts, requests = [], sorted(requests, key=_slot_key)
        if requests:
            row = {id(r): i for i, r in enumerate(pending.sampled)}
            prev = (pending.samples.device_tokens, [row[id(r)] for r in requests])
            parts.append(self.graphs.run(requests, prev))
        if prompts is None or not prompts.requests:
            return PendingStep(requests, self.sampler.launch(parts[0], requests))
        self._wait_for_adapters(prompts.requests)
        return self._with_prompts(parts, requests, prompts, self._replays(prompts))

    def fits_graphs(self, num_requests: int) -> bool:
        return self.graphs is not None and num_requests <= self.graphs.sizes[-1]

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
