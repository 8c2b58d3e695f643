"""ForwardBatch: everything one model forward needs, passed explicitly (no global context).

Tokens of all scheduled sequences are concatenated; sequence s owns token rows
``query_start_loc[s] : query_start_loc[s+1]``, which are the last ``q_len`` tokens of its
context of ``seq_lens[s]`` tokens (prefill, chunked prefill and decode look the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.config import ALL_TARGETS
from loraserve.kernels.lora import LoRABatch


@dataclass
class LoRAInputs:
    """What the LoRA kernels need in a step: the flat pool and the per-step tables."""

    pool: torch.Tensor  # [num_pages * page_elems], the page pool viewed flat
    meta: LoRABatch
    backend: str = "auto"
    # A mixed step's single-token rows, one segment each, in the matrix-vector (decode) form;
    # ``meta`` then holds the prefill rows. The two cover disjoint rows.
    decode: LoRABatch | None = None
    # Targets some adapter of the step adapts (bits of LORA_TARGETS): projections outside
    # it launch no LoRA kernels (every row would skip them).
    targets: int = ALL_TARGETS

    @property
    def metas(self) -> tuple[LoRABatch, ...]:
        return (self.meta,) if self.decode is None else (self.meta, self.decode)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, page * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    logits_indices: torch.Tensor  # [num_sampled] int64, rows whose logits are needed
    max_q_len: int
    max_seq_len: int
    lora: LoRAInputs | None = None  # None: no request in the batch uses an adapter
    # Sequences 0..D-1 have one query token each (token rows 0..D-1). In a step that also
    # prefills, attention runs them apart, in the decode form, instead of giving each the
    # max_q_len-row programs of the prefill form. 0: one launch for everything.
    num_decode_seqs: int = 0
    # The prefill sequences' (block_tables, seq_lens, query_start_loc) rows from
    # num_decode_seqs on, as tensors of their own (16-byte aligned: slices at a size-dependent
    # offset would make Triton compile new variants). None: sliced from the full tensors.
    prefill_part: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Prefill-form attention over these (sequence, query block) pairs only, int32 [M, 2]
    # (-1 padded; kernels.attention.attention_tile_tokens): padded CUDA graphs.
    attn_tiles: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
