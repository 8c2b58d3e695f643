"""Paged attention: reference vs dense attention, Triton kernel vs reference, store_kv.

The cache is always a strided view into a bigger pool, the way the engine passes it, with
scattered pages. Everything not written by store_kv (other layers, the unused tail of a
sequence's last page, the spare page that block table padding points at) is NaN, so a kernel
that reads a slot it should not reads NaN into its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from loraserve.kernels import attention
from loraserve.kernels.attention import (
    decode_num_splits,
    num_kv_splits,
    paged_attention,
    paged_attention_ref,
    paged_attention_triton,
    store_kv,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_LAYERS = 3
LAYER = 1

# (seq_len, q_len) per sequence
MIXED = [(37, 1), (50, 50), (70, 13), (9, 1)]  # decode, prefill, chunked prefill, decode
DECODE = [(1, 1), (70, 1), (33, 1)]
PREFILL = [(70, 70), (5, 5)]

# (num_heads, num_kv_heads, head_dim, block_size)
SHAPES = [
    (4, 4, 16, 16),  # MHA
    (8, 2, 24, 8),  # GQA, group of 4
    (6, 2, 80, 16),  # GQA, group of 3 (not a power of two)
    (4, 1, 64, 32),  # MQA
    (2, 2, 40, 1),  # one token per page
]


@dataclass
class Case:
    q: Tensor  # [num_tokens, num_heads, head_dim]
    k_seqs: list[Tensor]  # per sequence [seq_len, num_kv_heads, head_dim], dtype of the cache
    v_seqs: list[Tensor]
    pool: Tensor  # [num_pages, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim]
    block_tables: Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: Tensor  # int32 [num_seqs]
    query_start_loc: Tensor  # int32 [num_seqs + 1]
    scale: float

    @property
    def k_cache(self) -> Tensor:
        return self.pool[:, LAYER, 0]

    @property
    def v_cache(self) -> Tensor:
        return self.pool[:, LAYER, 1]

    def args(self) -> tuple:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.scale,
        )


def _scattered_tables(
    seq_lens: list[int], block_size: int, g: torch.Generator
) -> tuple[Tensor, int, int]:
    """Disjoint random pages per sequence; padding points at a spare (NaN) page.

    Returns block_tables int32 [num_seqs, max_blocks + 1], num_pages, spare page id.
    """
    blocks = [-(-n // block_size) for n in seq_lens]
    num_pages = sum(blocks) + 2
    perm = torch.randperm(num_pages, generator=g)
    spare = int(perm[-1])
    tables = torch.full((len(seq_lens), max(blocks) + 1), spare, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks):
        tables[s, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return tables, num_pages, spare


def _slots(table: Tensor, seq_len: int, block_size: int) -> Tensor:
    """int64 [seq_len] slot of every position of one sequence."""
    pos = torch.arange(seq_len)
    return table.long()[pos // block_size] * block_size + pos % block_size


def make_case(
    specs: list[tuple[int, int]],
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    seed: int = 0,
) -> Case:
    num_heads, num_kv_heads, head_dim, block_size = shape
    g = torch.Generator().manual_seed(seed)
    seq_lens = [n for n, _ in specs]
    q_lens = [m for _, m in specs]
    tables, num_pages, _ = _scattered_tables(seq_lens, block_size, g)
    pool_shape = (num_pages, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim)
    pool = torch.full(pool_shape, float("nan"), dtype=dtype, device=DEVICE)
    k_seqs, v_seqs = [], []
    for s, n in enumerate(seq_lens):
        k = torch.randn(n, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
        slots = _slots(tables[s], n, block_size).to(DEVICE)
        store_kv(k, v, pool[:, LAYER, 0], pool[:, LAYER, 1], slots)
        k_seqs.append(k)
        v_seqs.append(v)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(DEVICE, dtype)
    query_start_loc = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    return Case(
        q=q,
        k_seqs=k_seqs,
        v_seqs=v_seqs,
        pool=pool,
        block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=DEVICE),
        scale=head_dim**-0.5,
    )


def dense_attention(case: Case) -> Tensor:
    """Per sequence, per head SDPA on contiguous K/V with a bottom-right causal mask, fp32."""
    num_heads, num_kv_heads = case.q.shape[1], case.k_seqs[0].shape[1]
    out = torch.empty(case.q.shape, dtype=torch.float32, device=DEVICE)
    starts = case.query_start_loc.tolist()
    for s, (k, v) in enumerate(zip(case.k_seqs, case.v_seqs, strict=True)):
        q = case.q[starts[s] : starts[s + 1]].float()  # [q_len, num_heads, head_dim]
        q_len, seq_len = q.shape[0], k.shape[0]
        visible = torch.ones(q_len, seq_len, dtype=torch.bool, device=DEVICE)
        visible = visible.tril(diagonal=seq_len - q_len)
        for h in range(num_heads):
            kv_h = h // (num_heads // num_kv_heads)
            out[starts[s] : starts[s + 1], h] = F.scaled_dot_product_attention(
                q[None, :, h],
                k[None, :, kv_h].float(),
                v[None, :, kv_h].float(),
                attn_mask=visible,
                scale=case.scale,
            )[0]
    return out


@pytest.mark.parametrize("specs", [MIXED, DECODE, PREFILL], ids=["mixed", "decode", "prefill"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=["mha", "gqa4", "gqa3", "mqa"])
def test_reference_matches_dense(specs: list[tuple[int, int]], shape: tuple) -> None:
    case = make_case(specs, shape, torch.float32, seed=1)
    got = paged_attention_ref(*case.args())
    torch.testing.assert_close(got, dense_attention(case), atol=1e-5, rtol=1e-5)


TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("specs", [MIXED, DECODE, PREFILL], ids=["mixed", "decode", "prefill"])
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa4", "gqa3", "mqa", "bs1"])
def test_triton_matches_reference(
    shape: tuple, specs: list[tuple[int, int]], dtype: torch.dtype
) -> None:
    case = make_case(specs, shape, dtype, seed=2)
    got = paged_attention_triton(*case.args())
    want = paged_attention_ref(*case.args())
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_triton_writes_given_out_with_given_max_q_len() -> None:
    case = make_case(MIXED, SHAPES[1], torch.float32, seed=3)
    out = torch.full_like(case.q, float("nan"))
    got = paged_attention_triton(*case.args(), out=out, max_q_len=50)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, paged_attention_ref(*case.args()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("num_splits_forced", [None, 3])
def test_decode_and_prefill_sequences_in_two_launches(
    backend: str, num_splits_forced: int | None, monkeypatch
) -> None:
    """A mixed step's decode sequences (first, one row each) and prefill sequences attended
    in separate launches into one output (as the model does) equal one launch for all."""
    specs = [(37, 1), (9, 1), (20, 1), (50, 50), (70, 13)]
    case = make_case(specs, SHAPES[1], torch.float32, seed=6)
    want = paged_attention_ref(*case.args())
    if num_splits_forced is not None:  # the decode part through the split-KV kernels

        def splits(q, k_cache, num_seqs, max_q_len, max_seq_len):
            return num_splits_forced if max_q_len == 1 else 1

        monkeypatch.setattr(attention, "decode_num_splits", splits)
    out = torch.full_like(case.q, float("nan"))
    q, k, v, tables, lens, starts, scale = case.args()
    d = 3
    paged_attention(q, k, v, tables[:d], lens[:d], starts[: d + 1], scale, backend, 1, 70, out=out)
    assert out[d:].isnan().all()  # only the decode rows so far
    paged_attention(q, k, v, tables[d:], lens[d:], starts[d:], scale, backend, 50, 70, out=out)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_dispatch_picks_backend() -> None:
    case = make_case(MIXED, SHAPES[0], torch.float32, seed=4)
    ref = paged_attention(*case.args(), backend="torch")
    triton_out = paged_attention(*case.args(), backend="triton")
    torch.testing.assert_close(ref, paged_attention_ref(*case.args()), atol=0, rtol=0)
    torch.testing.assert_close(triton_out, ref, atol=1e-4, rtol=1e-4)
    auto_want = triton_out if DEVICE.type == "cuda" else ref
    torch.testing.assert_close(paged_attention(*case.args()), auto_want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown attention backend"):
        paged_attention(*case.args(), backend="cuda")


@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_store_kv_writes_only_addressed_slots(block_size: int) -> None:
    g = torch.Generator().manual_seed(5)
    num_pages, num_kv_heads, head_dim, num_tokens = 16, 2, 24, 11
    pool_shape = (num_pages, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim)
    pool = torch.randn(pool_shape, generator=g).to(DEVICE)
    slots = torch.randperm(num_pages * block_size, generator=g)[:num_tokens].to(DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE)

    want = pool.clone()
    for t, slot in enumerate(slots.tolist()):
        want[slot // block_size, LAYER, 0, slot % block_size] = k[t]
        want[slot // block_size, LAYER, 1, slot % block_size] = v[t]
    store_kv(k, v, pool[:, LAYER, 0], pool[:, LAYER, 1], slots)
    assert torch.equal(pool, want)


# Split-KV decode. Splits are runs of whole 64-position chunks (BLOCK_N; a page when pages are
# larger), so a 700-token context has 11 chunks, a 150-token one 3 and the short ones 1: with
# more splits than chunks (16 > 11; 3 and 8 against the short ones), the splits past a
# sequence's end are empty.
SPLIT_SHAPES = [
    (4, 4, 64, 16),  # MHA, head_dim 64
    (8, 2, 128, 16),  # GQA, group of 4, head_dim 128
    (6, 2, 80, 8),  # GQA, group of 3, head_dim not a power of two
    (4, 1, 24, 32),  # MQA
    (2, 2, 40, 1),  # one token per page
    (4, 2, 160, 128),  # head_dim > 128 (32-position tiles), a page longer than a tile
]


def split_decode_specs(block_size: int) -> list[tuple[int, int]]:
    """One token, exactly a page, a page + 1, long, medium: decode (q_len 1) each."""
    return [(1, 1), (block_size, 1), (block_size + 1, 1), (700, 1), (150, 1)]


@pytest.mark.parametrize("num_splits", [1, 3, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=["mha", "gqa4", "gqa3", "mqa", "bs1", "d160"])
def test_split_decode_matches_reference(shape: tuple, dtype: torch.dtype, num_splits: int) -> None:
    case = make_case(split_decode_specs(shape[3]), shape, dtype, seed=6)
    got = paged_attention_triton(*case.args(), max_q_len=1, num_splits=num_splits)
    want = paged_attention_ref(*case.args())
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_split_decode_skips_sequences_without_query() -> None:
    case = make_case([(200, 1), (90, 0), (5, 1)], SHAPES[1], torch.float32, seed=7)
    got = paged_attention_triton(*case.args(), max_q_len=1, num_splits=4)
    torch.testing.assert_close(got, paged_attention_ref(*case.args()), atol=1e-4, rtol=1e-4)


def test_num_kv_splits_fills_the_gpu_within_limits() -> None:
    h200 = 132
    assert num_kv_splits(1, 32, 2048, h200) == 8  # 2048 // 256 tokens per split
    assert num_kv_splits(1, 32, 8192, h200) == 9  # ceil(2 * 132 / 32) programs per (seq, head)
    assert num_kv_splits(4, 32, 8192, h200) == 3
    assert num_kv_splits(1, 8, 32768, h200) == 32  # capped
    assert num_kv_splits(16, 32, 8192, h200) == 1  # 512 programs: two waves already
    assert num_kv_splits(256, 32, 2048, h200) == 1
    assert num_kv_splits(1, 32, 300, h200) == 1  # too short to split
    assert num_kv_splits(0, 32, 2048, h200) == 1


def test_decode_num_splits_only_for_decode_with_max_seq_len() -> None:
    case = make_case(DECODE, SHAPES[3], torch.float32, seed=8)
    q, k_cache = case.q, case.k_cache
    assert decode_num_splits(q, k_cache, 3, 1, None) == 1
    assert decode_num_splits(q, k_cache, 3, 2, 2048) == 1  # not decode
    # The interpreter counts as 4 SMs: 3 sequences x 1 kv head -> ceil(8 / 3) = 3 splits.
    assert decode_num_splits(q, k_cache, 3, 1, 2048) == 3


class KernelSpy:
    """Records the grids a Triton kernel is launched with, then launches it."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.grids: list[tuple] = []

    def __getitem__(self, grid: tuple):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("max_seq_len", [None, 2048])
def test_max_seq_len_turns_split_kv_on(monkeypatch, max_seq_len: int | None) -> None:
    case = make_case(DECODE, SHAPES[3], torch.float32, seed=9)
    split = KernelSpy(attention._paged_decode_split_kernel)
    single = KernelSpy(attention._paged_attention_kernel)
    monkeypatch.setattr(attention, "_paged_decode_split_kernel", split)
    monkeypatch.setattr(attention, "_paged_attention_kernel", single)
    # max_seq_len is an upper bound (a CUDA graph passes the model's max length)
    got = paged_attention(*case.args(), backend="triton", max_q_len=1, max_seq_len=max_seq_len)
    torch.testing.assert_close(got, paged_attention_ref(*case.args()), atol=1e-4, rtol=1e-4)
    if max_seq_len is None:
        assert (split.grids, single.grids) == ([], [(1, 3, 1)])
    else:
        assert (split.grids, single.grids) == ([(3, 3, 1)], [])


def test_split_kv_needs_single_token_queries() -> None:
    case = make_case(MIXED, SHAPES[0], torch.float32, seed=10)
    with pytest.raises(ValueError, match="max_q_len == 1"):
        paged_attention_triton(*case.args(), max_q_len=50, num_splits=2)
    with pytest.raises(ValueError, match="num_splits >= 1"):
        paged_attention_triton(*case.args(), max_q_len=1, num_splits=0)
    # Prefill and mixed batches ignore max_seq_len.
    got = paged_attention_triton(*case.args(), max_seq_len=4096)
    torch.testing.assert_close(got, paged_attention_ref(*case.args()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=["mha", "gqa4", "gqa3"])
def test_triton_tile_map_matches_the_full_grid(shape: tuple) -> None:
    """Prefill attention over a host-built (sequence, query block) map, -1 padded, as padded
    CUDA graphs run it with a worst-case max_q_len: the same output as the full grid."""
    from loraserve.kernels.attention import attention_tile_tokens

    case = make_case(MIXED + [(0, 0)], shape, torch.float32, seed=4)  # + an empty sequence
    max_q_len = 128  # a graph's bucket: more than any sequence here
    tokens = attention_tile_tokens(shape[0], shape[1], max_q_len)
    entries = []
    for s, (_, q_len) in enumerate(MIXED):
        entries += [(s, b) for b in range(-(-q_len // tokens))]
    entries += [(-1, -1)] * 4
    tile_map = torch.tensor(entries, dtype=torch.int32, device=DEVICE)
    want = paged_attention_triton(*case.args(), max_q_len=max_q_len)
    got = paged_attention_triton(*case.args(), max_q_len=max_q_len, tile_map=tile_map)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
