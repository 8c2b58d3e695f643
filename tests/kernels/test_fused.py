"""Fused kernels (add+RMSNorm, rotary+KV store, silu*mul): Triton vs the torch reference.

fp32 must agree to ~1e-6; fp16 to one rounding step of the result (the kernels round where
torch rounds, so most elements are equal). The KV cache is a strided view into a bigger pool
of random values, and the whole pool is compared: a slot written that should not be shows.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from loraserve.config import RopeScaling
from loraserve.kernels.fused import (
    apply_rotary_ref,
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rotary_store_kv,
    rotary_store_kv_ref,
    rotary_store_kv_triton,
    silu_and_mul,
    silu_and_mul_ref,
    silu_and_mul_triton,
)
from loraserve.model.rope import RotaryEmbedding

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]
NUM_LAYERS = 3
LAYER = 1
MAX_POSITIONS = 300


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def assert_close(got: Tensor, want: Tensor) -> None:
    """fp32: ~1e-6. Half types: at most one rounding step (one ulp of the reference)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        return
    eps = torch.finfo(want.dtype).eps
    err = (got.float() - want.float()).abs()
    bound = eps * want.float().abs() + 2 * torch.finfo(want.dtype).smallest_normal
    assert (err <= bound).all(), f"max error {err.max().item()} beyond one rounding step"


# ---------------------------------------------------------------- add + RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("hidden", [48, 67, 256])
def test_add_rms_norm(dtype: torch.dtype, with_residual: bool, rows: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(hidden + rows)
    x = randn(rows, hidden, g=g, dtype=dtype, scale=3.0)
    residual = randn(rows, hidden, g=g, dtype=dtype) if with_residual else None
    weight = randn(hidden, g=g, dtype=dtype)
    out, s = fused_add_rms_norm_triton(x, residual, weight, 1e-5)
    want_out, want_s = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(s, want_s)  # one add, rounded once, on both paths
    if residual is None:
        assert s is x
    assert_close(out, want_out)


def test_add_rms_norm_strided_rows() -> None:
    """Rows with a stride larger than the hidden size (a column slice of a wider buffer)."""
    g = torch.Generator().manual_seed(3)
    x = randn(5, 80, g=g, dtype=torch.float32)[:, :67]
    residual = randn(5, 96, g=g, dtype=torch.float32)[:, 5:72]
    weight = randn(67, g=g, dtype=torch.float32)
    out, s = fused_add_rms_norm_triton(x, residual, weight, 1e-6)
    want_out, want_s = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    assert torch.equal(s, want_s)
    assert_close(out, want_out)


# ---------------------------------------------------------------- rotary + KV store

# (num_heads, num_kv_heads, head_dim, block_size)
ROTARY_SHAPES = [
    (4, 4, 16, 16),  # MHA
    (8, 2, 24, 8),  # GQA 4, half head_dim 12
    (6, 2, 20, 4),  # GQA 3, half head_dim 10
    (4, 1, 64, 1),  # MQA, one token per page
    (8, 2, 128, 16),  # Llama-3-like head_dim
]


def make_rotary_case(
    shape: tuple[int, int, int, int], tokens: int, dtype: torch.dtype, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """qkv, positions, cos, sin, slot_mapping (scattered, distinct), pool of random values."""
    num_heads, num_kv_heads, head_dim, block_size = shape
    g = torch.Generator().manual_seed(seed)
    rotary = RotaryEmbedding(head_dim, MAX_POSITIONS, RopeScaling(theta=500.0)).to(DEVICE)
    qkv = randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, g=g, dtype=dtype)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), generator=g).to(DEVICE)
    num_pages = tokens // block_size + 3
    slots = torch.randperm(num_pages * block_size, generator=g)[:tokens].to(DEVICE)
    pool_shape = (num_pages, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim)
    pool = randn(*pool_shape, g=g, dtype=dtype)
    return qkv, positions, rotary.cos, rotary.sin, slots, pool


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens", [1, 13])
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=["mha", "gqa4", "gqa3", "mqa", "hd128"])
def test_rotary_store_kv(shape: tuple, tokens: int, dtype: torch.dtype) -> None:
    qkv, positions, cos, sin, slots, pool = make_rotary_case(shape, tokens, dtype, seed=tokens)
    num_heads = shape[0]
    want_pool = pool.clone()
    want_q = rotary_store_kv_ref(
        qkv.clone(), positions, cos, sin, slots, want_pool[:, LAYER, 0], want_pool[:, LAYER, 1],
        num_heads,
    )  # fmt: skip
    q = rotary_store_kv_triton(
        qkv, positions, cos, sin, slots, pool[:, LAYER, 0], pool[:, LAYER, 1], num_heads
    )
    assert_close(q, want_q)
    assert q.data_ptr() == qkv.data_ptr()  # rotated in place
    written = pool != want_pool  # only the rotated K may differ, by a rounding step
    assert not written[:, :, 1].any() and not written[:, :LAYER].any()
    assert not written[:, LAYER + 1 :].any()
    assert_close(pool, want_pool)


def test_rotary_ref_is_hf_rotate_half() -> None:
    """apply_rotary_ref against HF's formula written out with the full-width tables."""
    g = torch.Generator().manual_seed(7)
    head_dim = 12
    rotary = RotaryEmbedding(head_dim, MAX_POSITIONS, RopeScaling())
    q = torch.randn(5, 3, head_dim, generator=g)
    k = torch.randn(5, 1, head_dim, generator=g)
    positions = torch.tensor([0, 1, 7, 100, 299])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # [T, 1, head_dim]

    def hf(x: Tensor) -> Tensor:
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()

    got_q, got_k = apply_rotary_ref(positions, q, k, rotary.cos, rotary.sin)
    torch.testing.assert_close(got_q, hf(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, hf(k), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- silu * mul


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("inter", [96, 173, 1500])
def test_silu_and_mul(dtype: torch.dtype, rows: int, inter: int) -> None:
    g = torch.Generator().manual_seed(inter + rows)
    gate_up = randn(rows, 2 * inter, g=g, dtype=dtype, scale=4.0)
    assert_close(silu_and_mul_triton(gate_up), silu_and_mul_ref(gate_up))


# ---------------------------------------------------------------- dispatch


def test_dispatch_picks_backend() -> None:
    g = torch.Generator().manual_seed(11)
    x = randn(3, 40, g=g, dtype=torch.float32)
    weight = randn(40, g=g, dtype=torch.float32)
    auto_is_triton = DEVICE.type == "cuda"
    for backend in ("auto", "torch", "triton"):
        triton_path = backend == "triton" or (backend == "auto" and auto_is_triton)
        want = silu_and_mul_triton(x) if triton_path else silu_and_mul_ref(x)
        assert torch.equal(silu_and_mul(x, backend=backend), want)
        want_norm = (fused_add_rms_norm_triton if triton_path else fused_add_rms_norm_ref)(
            x, x, weight, 1e-5
        )[0]
        assert torch.equal(fused_add_rms_norm(x, x, weight, 1e-5, backend=backend)[0], want_norm)
    with pytest.raises(ValueError, match="unknown fused-kernel backend"):
        silu_and_mul(x, backend="cuda")


def test_rotary_dispatch_torch_path_leaves_qkv() -> None:
    qkv, positions, cos, sin, slots, pool = make_rotary_case((4, 2, 16, 8), 5, torch.float32, 1)
    before = qkv.clone()
    args = (qkv, positions, cos, sin, slots, pool[:, LAYER, 0], pool[:, LAYER, 1], 4)
    q = rotary_store_kv(*args, backend="torch")
    assert torch.equal(qkv, before)
    assert q.shape == (5, 4, 16)
