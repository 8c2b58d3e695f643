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

from loraserve.kernels.attention import (
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
