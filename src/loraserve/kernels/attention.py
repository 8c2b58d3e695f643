"""Paged, variable-length, causal attention over a KV cache kept in the shared page pool.

Each KV page holds ``block_size`` consecutive tokens of one sequence for every layer. The
caller hands one layer's K and V as strided views into the pool buffer:

    pool  [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim]   (page stride >= this)
                          |       |
                        layer   0 = K, 1 = V
    k_cache = pool[:, layer, 0]  ->  [num_pages, block_size, num_kv_heads, head_dim]
    v_cache = pool[:, layer, 1]      (not contiguous: only the last dim has stride 1)

A sequence's KV position ``p`` lives in page ``block_tables[s, p // block_size]`` at offset
``p % block_size``. Pages of one sequence may lie anywhere in the pool:

    block_tables[s] = [ 7, 2, 9, ... ]
    positions         0..bs-1 | bs..2bs-1 | 2bs..3bs-1 | ...
    pool pages      ... [2] ... [7] ... [9] ...

The query tokens of all sequences are concatenated in batch order; sequence ``s`` owns rows
``query_start_loc[s] : query_start_loc[s + 1]`` of ``q``. They are the last ``q_len`` tokens
of its ``seq_len``-token context, so one call serves decode (q_len = 1), prefill
(q_len = seq_len) and chunked prefill (1 < q_len < seq_len) alike:

    q_len = query_start_loc[s + 1] - query_start_loc[s]
    query j sits at position  seq_len - q_len + j  and sees KV positions 0 .. that position

The K/V of the query tokens must already be in the cache (``store_kv``) before attention runs.
Query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)`` (MHA, GQA and MQA).

The Triton kernel feeds tl.dot with operands in the cache dtype (fp16/bf16 tensor cores, fp32
in IEEE precision) and keeps the softmax state and accumulator in fp32. Triton's CPU
interpreter gets bf16 dots wrong, so on the CPU it is tested in fp32 and fp16 only.

One program per (query block, sequence, kv head) leaves most SMs idle in decode at small
batch. There (every q_len <= 1, few sequences x kv heads against the SM count, long contexts)
each context is cut into ``num_splits`` runs of whole pages (split-KV, "flash-decoding"):

    positions of one sequence   0 ............................... seq_len
    num_splits = 4              | split 0  | split 1  | split 2  |          (split 3 empty)
                                  runs of ceil(chunks / num_splits) chunks of
                                  SPLIT_UNIT = max(BLOCK_N, block_size) tokens

    kernel 1, grid (split, seq, kv head): for each query head of the group, over its run,
        m  = max of the scaled scores (log2 units), l = sum 2^(s - m), acc = sum 2^(s - m) v
        (fp32, unnormalised; an empty run stores m = -1e30, l = 0, acc = 0)
    kernel 2, grid (seq, query head):
        M = max_i m_i,   out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i

The number of splits comes from host ints only (batch size, kv heads, SM count, an upper
bound on the context), so a captured CUDA graph keeps its grid; the runs follow each
sequence's actual length on the device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from loraserve.kernels.host import cdiv, next_power_of_2
from loraserve.kernels.tile_map import program_tile

_LOG2E = 1.4426950408889634

# Split-KV decode: split until the grid holds about _SPLIT_WAVES programs per SM, each split
# at least _MIN_SPLIT_TOKENS of the longest context, at most _MAX_SPLITS splits.
_SPLIT_WAVES = 2
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 32
_INTERPRETER_SMS = 4  # the CPU interpreter has no SMs: few, so that tests take the split path


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write each token's K and V into its cache slot.

    k, v: [num_tokens, num_kv_heads, head_dim]
    k_cache, v_cache: [num_pages, block_size, num_kv_heads, head_dim], strided views into the pool
    slot_mapping: int64 [num_tokens], slot = page * block_size + offset_in_page
    """
    block_size = k_cache.shape[1]
    pages = slot_mapping // block_size  # [num_tokens]
    offsets = slot_mapping % block_size  # [num_tokens]
    k_cache[pages, offsets] = k.to(k_cache.dtype)
    v_cache[pages, offsets] = v.to(v_cache.dtype)


def _gather_kv(cache: Tensor, pages: Tensor, seq_len: int) -> Tensor:
    """One sequence's KV, contiguous.

    cache: [num_pages, block_size, kv_heads, head_dim]; pages: [n] -> [seq_len, kv_heads, head_dim]
    """
    gathered = cache[pages]  # [n, block_size, kv_heads, head_dim], a contiguous copy
    return gathered.flatten(0, 1)[:seq_len]


def _attend_ref(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention of the last q_len positions, fp32.

    q: [q_len, num_heads, head_dim]; k, v: [seq_len, num_heads, head_dim]
    returns [q_len, num_heads, head_dim]
    """
    q_len, seq_len = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [num_heads, q_len, seq_len]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # [q_len]
    k_pos = torch.arange(seq_len, device=q.device)  # [seq_len]
    future = k_pos[None, :] > q_pos[:, None]  # [q_len, seq_len]
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def paged_attention_ref(
    q: Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: Tensor,  # [num_pages, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_pages, block_size, num_kv_heads, head_dim]
    block_tables: Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: Tensor,  # int32 [num_seqs]
    query_start_loc: Tensor,  # int32 [num_seqs + 1]
    scale: float,
    out: Tensor | None = None,  # written only at the batch's query rows
) -> Tensor:  # [num_tokens, num_heads, head_dim], dtype of q
    """Plain torch paged attention: one sequence at a time, fp32 inside."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        if starts[s] == starts[s + 1]:
            continue  # no query rows (a padding sequence of a graphed prefill)
        pages = block_tables[s, : -(-seq_len // block_size)].long()
        k = _gather_kv(k_cache, pages, seq_len).float().repeat_interleave(group, dim=1)
        v = _gather_kv(v_cache, pages, seq_len).float().repeat_interleave(group, dim=1)
        rows = slice(starts[s], starts[s + 1])
        out[rows] = _attend_ref(q[rows].float(), k, v, scale).to(q.dtype)
    return out


@triton.jit
def _kv_slots(
    block_table_ptr,  # this sequence's row of block_tables
    k_pos,  # [BLOCK_N] absolute KV positions
    kv_ok,  # [BLOCK_N] position is inside the context
    PAGE_SIZE: tl.constexpr,
):
    """(page id as int64, offset in page) of each KV position: [BLOCK_N] each."""
    page = tl.load(block_table_ptr + k_pos // PAGE_SIZE, mask=kv_ok, other=0).to(tl.int64)
    return page, k_pos % PAGE_SIZE


@triton.jit
def _attend_kv_range(
    q,  # [BLOCK_M, BLOCK_D] query rows, cache dtype
    q_pos,  # [BLOCK_M] absolute position of each row's query (causal mask)
    kv_start,  # first KV position, a multiple of BLOCK_N
    kv_end,  # one past the last KV position
    block_table_ptr,  # this sequence's row of block_tables
    k_base,  # k_cache at this kv head
    v_base,
    scale_log2,
    stride_k_page,
    stride_k_off,
    stride_v_page,
    stride_v_off,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax of q over KV positions [kv_start, kv_end), fp32 and unnormalised.

    Returns m [BLOCK_M] (max scaled score, log2 units; -1e30 when nothing is visible),
    l [BLOCK_M] (sum of 2^(s - m)) and acc [BLOCK_M, BLOCK_D] (sum of 2^(s - m) v).
    """
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # The running max starts finite, so 2^(m - m') never computes -inf - (-inf).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(kv_start, kv_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        kv_ok = k_pos < kv_end
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        page, offset = _kv_slots(block_table_ptr, k_pos, kv_ok, PAGE_SIZE)
        k_off = page * stride_k_page + offset * stride_k_off  # [BLOCK_N]
        v_off = page * stride_v_page + offset * stride_v_off  # [BLOCK_N]
        k = tl.load(k_base + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        visible = kv_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # masked entries: exp2(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["stride_bt_seq"])
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,  # softmax scale * log2(e): the kernel uses exp2
    stride_q_tok,
    stride_q_head,
    stride_k_page,
    stride_k_off,
    stride_k_head,
    stride_v_page,
    stride_v_off,
    stride_v_head,
    stride_o_tok,
    stride_o_head,
    stride_bt_seq,
    tile_map_ptr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_M: tl.constexpr,  # rows = (query token, query head of the group) pairs
    BLOCK_N: tl.constexpr,  # KV positions per tile
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
    DOT_PRECISION: tl.constexpr,
    TILE_MAP: tl.constexpr = False,  # program_id(0) indexes tile_map_ptr's (seq, q block)
):
    """One program: BLOCK_M // GROUP query tokens of one sequence x GROUP heads of one kv head."""
    seq, q_block = program_tile(tile_map_ptr, TILE_MAP, 1)  # grid axes (q block, seq)
    if seq < 0:
        return
    kv_head = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * TOKENS >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = q_block * TOKENS + rows // GROUP  # [BLOCK_M] query token index within the sequence
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M] query head
    row_ok = (rows < TOKENS * GROUP) & (tok < q_len)
    q_pos = seq_len - q_len + tok  # [BLOCK_M] absolute position of the query
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q_rows = (q_start + tok).to(tl.int64) * stride_q_tok + head * stride_q_head
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]

    # KV positions past the last query of this block are never attended: skip those tiles.
    kv_end = tl.minimum(seq_len, seq_len - q_len + (q_block + 1) * TOKENS)
    m_i, l_i, acc = _attend_kv_range(
        q,
        q_pos,
        0,
        kv_end,
        block_tables_ptr + seq.to(tl.int64) * stride_bt_seq,
        k_ptr + kv_head * stride_k_head,
        v_ptr + kv_head * stride_v_head,
        scale_log2,
        stride_k_page,
        stride_k_off,
        stride_v_page,
        stride_v_off,
        HEAD_DIM,
        PAGE_SIZE,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_rows = (q_start + tok).to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _split_range(seq_len, split, num_splits, SPLIT_UNIT: tl.constexpr):
    """[start, end) of one split's KV positions: the context cut into chunks of SPLIT_UNIT
    tokens (whole pages, whole KV tiles), ceil(chunks / num_splits) chunks per split; splits
    past the last chunk get start >= end (empty)."""
    chunks_per_split = tl.cdiv(tl.cdiv(seq_len, SPLIT_UNIT), num_splits)
    start = split * chunks_per_split * SPLIT_UNIT
    return start, tl.minimum(start + chunks_per_split * SPLIT_UNIT, seq_len)


@triton.jit(do_not_specialize=["num_splits", "stride_bt_seq"])
def _paged_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    acc_ptr,  # fp32 [num_seqs, num_heads, num_splits, head_dim]
    m_ptr,  # fp32 [num_seqs, num_heads, num_splits]
    l_ptr,  # fp32 [num_seqs, num_heads, num_splits], same strides as m
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,  # softmax scale * log2(e): the kernel uses exp2
    num_splits,
    stride_q_tok,
    stride_q_head,
    stride_k_page,
    stride_k_off,
    stride_k_head,
    stride_v_page,
    stride_v_off,
    stride_v_head,
    stride_a_seq,
    stride_a_head,
    stride_a_split,
    stride_ml_seq,
    stride_ml_head,
    stride_bt_seq,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_M: tl.constexpr,  # rows = query heads of the group, padded to >= 16 for tl.dot
    BLOCK_N: tl.constexpr,  # KV positions per tile
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
    DOT_PRECISION: tl.constexpr,
    SPLIT_UNIT: tl.constexpr,  # splits are runs of whole chunks of this many positions
):
    """One program: one KV split of one sequence's single query token x GROUP query heads of
    one kv head. Stores the split's m, l and unnormalised acc (an empty split: -1e30, 0, 0)."""
    split = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return  # no query token: the combine kernel skips this sequence too
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_start, kv_end = _split_range(seq_len, split, num_splits, SPLIT_UNIT)

    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows  # [BLOCK_M] query head
    row_ok = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_rows = q_start.to(tl.int64) * stride_q_tok + head * stride_q_head
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)  # sees every position

    m_i, l_i, acc = _attend_kv_range(
        q,
        q_pos,
        kv_start,
        kv_end,
        block_tables_ptr + seq.to(tl.int64) * stride_bt_seq,
        k_ptr + kv_head * stride_k_head,
        v_ptr + kv_head * stride_v_head,
        scale_log2,
        stride_k_page,
        stride_k_off,
        stride_v_page,
        stride_v_off,
        HEAD_DIM,
        PAGE_SIZE,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )
    ml_rows = seq.to(tl.int64) * stride_ml_seq + head * stride_ml_head + split  # [BLOCK_M]
    tl.store(m_ptr + ml_rows, m_i, mask=row_ok)
    tl.store(l_ptr + ml_rows, l_i, mask=row_ok)
    a_rows = seq.to(tl.int64) * stride_a_seq + head * stride_a_head + split * stride_a_split
    tl.store(acc_ptr + a_rows[:, None] + d[None, :], acc, mask=q_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    acc_ptr,  # fp32 [num_seqs, num_heads, num_splits, head_dim]
    m_ptr,  # fp32 [num_seqs, num_heads, num_splits]
    l_ptr,  # fp32 [num_seqs, num_heads, num_splits], same strides as m
    out_ptr,
    query_start_loc_ptr,
    num_splits,
    stride_a_seq,
    stride_a_head,
    stride_a_split,
    stride_ml_seq,
    stride_ml_head,
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of two (>= 2)
    BLOCK_D: tl.constexpr,
):
    """One program: one query head of one sequence; merges its splits by log-sum-exp."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return

    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    ml_rows = seq.to(tl.int64) * stride_ml_seq + head * stride_ml_head + splits  # [BLOCK_S]
    m_s = tl.load(m_ptr + ml_rows, mask=s_ok, other=float("-inf"))
    l_s = tl.load(l_ptr + ml_rows, mask=s_ok, other=0.0)
    a_rows = seq.to(tl.int64) * stride_a_seq + head * stride_a_head + splits * stride_a_split
    a_mask = s_ok[:, None] & d_ok[None, :]
    acc = tl.load(acc_ptr + a_rows[:, None] + d[None, :], mask=a_mask, other=0.0)

    # Split 0 always stores, so m_max >= -1e30 is finite; padding (-inf) and empty splits
    # (-1e30, l = 0, acc = 0) get weight 0 next to any non-empty split.
    m_max = tl.max(m_s, axis=0)
    w = tl.exp2(m_s - m_max)  # [BLOCK_S]
    denom = tl.sum(w * l_s, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)  # [BLOCK_D]
    o_row = q_start.to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(out_ptr + o_row + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _max_q_len(query_start_loc: Tensor) -> int:
    """Longest query run in the batch (syncs with the device)."""
    return int((query_start_loc[1:] - query_start_loc[:-1]).max().item())


def _block_m(group: int, max_q_len: int) -> int:
    """Rows per program: every head of the group, and up to 64 rows of query tokens."""
    rows = next_power_of_2(group * max_q_len)
    return max(16, next_power_of_2(group), min(64, rows))


def _check_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"cache shapes {k_cache.shape}, {v_cache.shape} do not fit q {q.shape}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim")


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; _INTERPRETER_SMS on the CPU interpreter."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per context for split-KV decode; 1 means no split.

    Enough splits that the grid holds about _SPLIT_WAVES programs per SM, each split at least
    _MIN_SPLIT_TOKENS of the longest context, at most _MAX_SPLITS. Host ints only, so it is
    static under CUDA graph capture.
    """
    programs = num_seqs * num_kv_heads
    if programs == 0:
        return 1
    fill = -(-_SPLIT_WAVES * num_sms // programs)
    return max(1, min(fill, max_seq_len // _MIN_SPLIT_TOKENS, _MAX_SPLITS))


def decode_num_splits(
    q: Tensor, k_cache: Tensor, num_seqs: int, max_q_len: int, max_seq_len: int | None
) -> int:
    """The num_splits paged_attention_triton picks by itself (1: the single-kernel path)."""
    if max_seq_len is None or max_q_len != 1:
        return 1
    return num_kv_splits(num_seqs, k_cache.shape[2], max_seq_len, _sm_count(q.device))


def _kernel_meta(q: Tensor, k_cache: Tensor, max_q_len: int) -> dict:
    """Compile-time parameters shared by the single-kernel and the split-KV paths."""
    head_dim = q.shape[2]
    group = q.shape[1] // k_cache.shape[2]
    block_d = max(16, next_power_of_2(head_dim))
    return dict(
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        GROUP=group,
        BLOCK_M=_block_m(group, max_q_len),
        BLOCK_N=64 if block_d <= 128 else 32,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _cache_strides(k_cache: Tensor, v_cache: Tensor) -> tuple[int, ...]:
    """(page, offset, head) strides of K, then of V."""
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


def _split_kv_decode(
    q: Tensor,  # [num_tokens, num_heads, head_dim], one token per sequence
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    out: Tensor,
    num_splits: int,
) -> None:
    """Split-KV decode: kernel 1 per (split, seq, kv head) into fp32 scratch, kernel 2 merges."""
    num_seqs, num_heads, head_dim = seq_lens.shape[0], q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    acc = torch.empty(
        (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    m_s, l_s = torch.empty(
        (2, num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device
    ).unbind(0)
    meta = _kernel_meta(q, k_cache, 1)
    _paged_decode_split_kernel[(num_splits, num_seqs, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        acc,
        m_s,
        l_s,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * _LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        *_cache_strides(k_cache, v_cache),
        *acc.stride()[:3],
        *m_s.stride()[:2],
        block_tables.stride(0),
        **meta,
        SPLIT_UNIT=max(meta["BLOCK_N"], meta["PAGE_SIZE"]),
    )
    _combine_splits_kernel[(num_seqs, num_heads)](
        acc,
        m_s,
        l_s,
        out,
        query_start_loc,
        num_splits,
        *acc.stride()[:3],
        *m_s.stride()[:2],
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        # One variant for every split count up to _MAX_SPLITS (masked lanes cost nothing).
        BLOCK_S=next_power_of_2(max(_MAX_SPLITS, num_splits)),
        BLOCK_D=meta["BLOCK_D"],
    )


def paged_attention_triton(
    q: Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: Tensor,  # [num_pages, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_pages, block_size, num_kv_heads, head_dim]
    block_tables: Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: Tensor,  # int32 [num_seqs]
    query_start_loc: Tensor,  # int32 [num_seqs + 1]
    scale: float,
    out: Tensor | None = None,  # [num_tokens, num_heads, head_dim], dtype of q
    max_q_len: int | None = None,  # longest query run; computed (device sync) when None
    max_seq_len: int | None = None,  # >= the longest context; None: no split-KV decode
    num_splits: int | None = None,  # force split-KV decode with this many splits
    tile_map: Tensor | None = None,  # int32 [M, 2] (sequence, query block), -1 padded
) -> Tensor:  # [num_tokens, num_heads, head_dim], dtype of q
    """Flash-attention style paged attention in one Triton kernel launch, or two for decode.

    A given max_q_len must be at least the longest query run: it sizes the grid, and query
    tokens past it are left unwritten. With max_q_len == 1 and a max_seq_len, decode splits
    each context over num_kv_splits(...) programs when the batch is too small to fill the
    GPU; a given num_splits (tests, benchmarks) forces that path and needs max_q_len == 1.
    """
    _check_inputs(q, k_cache, v_cache)
    num_kv_heads = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    if max_q_len is None:
        max_q_len = _max_q_len(query_start_loc)
    if num_splits is not None and (num_splits < 1 or max_q_len != 1):
        raise ValueError(f"num_splits={num_splits} needs num_splits >= 1 and max_q_len == 1")
    if num_splits is None:
        num_splits = decode_num_splits(q, k_cache, num_seqs, max_q_len, max_seq_len)
        if num_splits == 1:
            num_splits = None
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out)
    if num_splits is not None:
        _split_kv_decode(*args, num_splits)
        return out

    meta = _kernel_meta(q, k_cache, max_q_len)
    grid = (cdiv(max_q_len, meta["BLOCK_M"] // meta["GROUP"]), num_seqs, num_kv_heads)
    if tile_map is not None:  # built with attention_tile_tokens(...) query tokens a block
        grid = (tile_map.shape[0], 1, num_kv_heads)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        *_cache_strides(k_cache, v_cache),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        block_tables if tile_map is None else tile_map,  # (unused without a map)
        TILE_MAP=tile_map is not None,
        **meta,
    )
    return out


def attention_tile_tokens(num_heads: int, num_kv_heads: int, max_q_len: int) -> int:
    """Query tokens per program of the prefill-form kernel: the block a tile map's entries
    count in."""
    group = num_heads // num_kv_heads
    return _block_m(group, max_q_len) // group


def paged_attention(
    q: Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: Tensor,  # [num_pages, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_pages, block_size, num_kv_heads, head_dim]
    block_tables: Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: Tensor,  # int32 [num_seqs]
    query_start_loc: Tensor,  # int32 [num_seqs + 1]
    scale: float,
    backend: str = "auto",  # "auto": triton on CUDA, torch elsewhere; "torch" | "triton"
    max_q_len: int | None = None,  # only used by the triton backend
    max_seq_len: int | None = None,  # only used by the triton backend (split-KV decode)
    out: Tensor | None = None,  # write here (only the batch's query rows are written)
    tile_map: Tensor | None = None,  # only used by the triton backend (see there)
) -> Tensor:  # [num_tokens, num_heads, head_dim], dtype of q
    """Causal paged attention of the batch's query tokens over their cached contexts.
    Sequence s owns query rows query_start_loc[s] .. query_start_loc[s + 1] of ``q`` (absolute
    rows: a batch may be a slice of the sequences of a larger one)."""
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    if backend == "torch":
        return paged_attention_ref(*args, out=out)
    if backend == "triton":
        return paged_attention_triton(
            *args, out=out, max_q_len=max_q_len, max_seq_len=max_seq_len, tile_map=tile_map
        )
    raise ValueError(f"unknown attention backend {backend!r}")
