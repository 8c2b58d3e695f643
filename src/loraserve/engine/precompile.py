"""Compile every Triton kernel variant the engine can launch, before it serves.

Triton compiles a kernel the first time it meets a new set of compile-time parameters; on
an H200 that takes 0.2-2 s per variant, during which the step (and every request in it)
waits. A 60 s S-LoRA run at 40 req/s met 76 new variants mid-run (docs/benchmarks.md).
The int arguments that vary per call are marked ``do_not_specialize`` in the kernels; what
remains is a handful of block-size choices, which depend on host ints only:

    prefill / mixed steps   LoRA tiles by the longest adapter segment (and the K split by
                            the number of segments), attention rows by the longest query
                            run: a few buckets of next_power_of_2(len)
    decode rows             LoRA matrix-vector tiles by the number of segments (the decode
                            rows of mixed steps, and eager decode steps), attention with
                            and without split-KV (CUDA graphs capture their own)

``precompile`` runs one model forward per distinct variant, on a scratch page with LoRA
segments of slot -1 (the kernels launch, compile, and skip the rows), so the real strides
and dtypes are the ones compiled. The engine calls it on CUDA only (the CPU interpreter
compiles nothing); tests call it on the CPU to run every probe forward.
"""

from __future__ import annotations

import logging
import time

import torch

from loraserve.kernels.attention import _block_m, decode_num_splits
from loraserve.kernels.host import next_power_of_2
from loraserve.kernels.lora import (
    FUSED_MAX_RANK,
    _fused_tiles,
    _num_sms,
    _pick_tiles,
    fuses_decode,
)
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.pool import PageKind, PagePool
from loraserve.model.batch import ForwardBatch, LoRAInputs
from loraserve.model.layers import PackedLinear
from loraserve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

_MAX_PREFILL_PROBE = 256  # every block-size choice saturates well below this many rows


def prefill_shapes(
    linears: list[PackedLinear],
    group: int,
    max_rank: int,
    max_len: int,
    max_seqs: int,
    max_tokens: int,
    num_sms: int,
) -> list[tuple[int, int]]:
    """One (longest query, sequences) pair per distinct (attention rows, LoRA prefill tiles)
    variant. Probed as one sequence of that length and the rest of 2 tokens, each its own
    LoRA segment: the segment count moves the shrink's K split, and Triton specialises
    split_k == 1 apart."""
    seen: dict[tuple, tuple[int, int]] = {}
    shapes = _shapes(linears)
    for n in range(2, min(max_len, _MAX_PREFILL_PROBE) + 1):
        seqs = min(max_seqs, (max_tokens - n) // 2 + 1)
        for s in range(1, seqs + 1):
            key = (_block_m(group, n), _lora_key(shapes, max_rank, n, s, num_sms))
            seen.setdefault(key, (n, s))
    return sorted(seen.values())


def decode_batch_sizes(
    linears: list[PackedLinear],
    max_rank: int,
    max_seqs: int,
    num_sms: int,
    fused: bool = False,
    fused_max_rank: int = FUSED_MAX_RANK,
) -> list[int]:
    """One decode batch size per distinct LoRA matrix-vector tile choice (``fused``,
    ``fused_max_rank``: the batches' LoRABatch.fused_decode and fused_max_rank)."""
    seen: dict[tuple, int] = {}
    shapes = _shapes(linears)
    for s in range(1, max_seqs + 1):
        seen.setdefault(_lora_key(shapes, max_rank, 1, s, num_sms, fused, fused_max_rank), s)
    return sorted(seen.values())


def _lora_key(
    shapes: list[tuple[int, int, int]],
    max_rank: int,
    seg_len: int,
    segments: int,
    num_sms: int,
    fused: bool = False,
    fused_max_rank: int = FUSED_MAX_RANK,
) -> tuple:
    """The compile-time part of every layer's LoRA tiles. split_k is a runtime int, of which
    Triton specialises only == 1 and % 16 == 0; the decode expand kernel also sums the
    splits in a power-of-two block (BLOCK_S). The fused decode kernel's output split is a
    runtime int it does not specialise at all."""
    key = []
    for in_features, n_targets, max_out in shapes:
        if fuses_decode(fused, seg_len, max_rank, fused_max_rank):
            shape = (max_rank, segments, in_features, n_targets, max_out, num_sms)
            key.append((_fused_tiles(*shape)._replace(fused=1), None))
            continue
        tiles = _pick_tiles(max_rank, seg_len, segments, in_features, n_targets, max_out, num_sms)
        k = tiles.split_k
        split = (k == 1, k % 16 == 0, next_power_of_2(k) if tiles.block_m == 1 else 0)
        key.append((tiles._replace(split_k=0), split))
    return tuple(key)


def _shapes(linears: list[PackedLinear]) -> list[tuple[int, int, int]]:
    """The distinct (in_features, targets, widest target) of the layers' packed linears."""
    shapes = {(m.in_features, len(m.out_slices), max(n for _, n in m.out_slices)) for m in linears}
    return sorted(shapes)


def precompile(
    model: LlamaForCausalLM,
    pool: PagePool,
    adapter_cache: AdapterCache | None,
    lora_backend: str,
    block_size: int,
    max_model_len: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    eager_decode_max: int,
) -> int:
    """Run one forward per kernel variant (see the module docstring); returns how many.
    ``eager_decode_max``: the most decode rows a step runs without a CUDA graph (0: none)."""
    device = model.embed_tokens.weight.device
    start = time.perf_counter()
    page = pool.allocate(1, PageKind.RESERVED)
    if page is None:
        raise ValueError("the page pool has no page left to compile the kernels with")
    lora = adapter_cache is not None and lora_backend in ("auto", "triton")
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)] if lora else []
    max_rank = adapter_cache.max_rank if lora else 0
    sms = _num_sms(device)
    attn = model.layers[0].attn
    group = attn.num_heads // attn.k_cache.shape[2]
    forwards = 0
    try:
        probe = _Probe(model, page[0], block_size, adapter_cache if lora else None, device)
        longest = min(max_model_len - 1, max_num_batched_tokens)
        # steps whose adapters all fit a narrower width run tiles for it (width_for)
        small = adapter_cache.small_rank if lora else 0
        widths = [max(max_rank, 1)] + ([small] if small else [])
        for rank in widths:
            shapes = prefill_shapes(
                linears, group, rank, longest, max_num_seqs, max_num_batched_tokens, sms
            )
            for n, seqs in shapes:
                probe.run([n] + [2] * (seqs - 1), max_seq_len=n, max_rank=rank)
                forwards += 1
        if eager_decode_max > 0:
            fused = adapter_cache.fused_decode if lora else False
            limit = adapter_cache.fused_max_rank if lora else FUSED_MAX_RANK
            for rank in widths:
                for s in decode_batch_sizes(linears, rank, eager_decode_max, sms, fused, limit):
                    probe.run([1] * s, max_seq_len=1, max_rank=rank)
                    forwards += 1
            q = torch.empty(1, attn.num_heads, attn.head_dim, device=device)
            if decode_num_splits(q, attn.k_cache, 1, 1, max_model_len) > 1:
                probe.run([1], max_seq_len=max_model_len)  # the split-KV decode kernels
                forwards += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        pool.free(page)
    logger.info(
        "compiled kernels with %d forwards in %.1f s", forwards, time.perf_counter() - start
    )
    return forwards


class _Probe:
    """Forwards of sequences whose KV all lands on one scratch page; LoRA segments (one per
    sequence) have slot -1, so the LoRA kernels launch and skip every row."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        page: int,
        block_size: int,
        adapter_cache: AdapterCache | None,
        device: torch.device,
    ) -> None:
        self.model = model
        self.page = page
        self.block_size = block_size
        self.cache = adapter_cache
        self.device = device

    def run(self, q_lens: list[int], max_seq_len: int, max_rank: int | None = None) -> None:
        tokens = sum(q_lens)
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        seq_lens = [max(n, 1) for n in q_lens]
        pages = -(-max(seq_lens) // self.block_size)

        def t(data: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype, device=self.device)

        slots = [self.page * self.block_size + i % self.block_size for i in range(tokens)]
        lora = None
        if self.cache is not None:
            meta = self.cache.lora_batch(
                t(starts, torch.int32), t([-1] * len(q_lens), torch.int32), max(q_lens), max_rank
            )
            lora = LoRAInputs(self.cache.pool.buffer.view(-1), meta, "triton")
        batch = ForwardBatch(
            input_ids=t([0] * tokens, torch.int64),
            positions=t([i % self.block_size for i in range(tokens)], torch.int64),
            slot_mapping=t(slots, torch.int64),
            block_tables=t([[self.page] * pages for _ in q_lens], torch.int32),
            seq_lens=t(seq_lens, torch.int32),
            query_start_loc=t(starts, torch.int32),
            logits_indices=t([s - 1 for s in starts[1:]], torch.int64),
            max_q_len=max(q_lens),
            max_seq_len=max_seq_len,
            lora=lora,
        )
        with torch.inference_mode():
            self.model.compute_logits(self.model(batch))
