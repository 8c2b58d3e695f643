"""Fused elementwise kernels of the decoder layer: 4 launches a layer where eager torch made 40.

    fused_add_rms_norm   s = x + residual; out = weight * rms_norm(s)        (returns out, s)
    rotary_store_kv      qkv -> RoPE(q) in place; RoPE(k) and v written into their KV slots
    silu_and_mul         gate|up -> silu(gate) * up

Each has a torch reference (``*_ref``, the CPU path and the model's semantics) and a Triton
kernel that reproduces the reference's rounding in the model dtype: it loads, computes in
fp32 and rounds to the model dtype wherever torch's op-by-op version rounds. Products of two
fp16/bf16 values are exact in fp32, so a product rounded once equals torch's product; what
can differ is the order of a reduction (RMSNorm's mean) and the last bit of fp32 exp/rsqrt.

The decoder layer uses them vLLM style: a layer takes (x, residual) and returns its MLP
output and the residual stream before it, so each residual add is fused into the norm after
it, and the final norm takes the last add:

    x0 = embed                      residual = None
    layer i:  h, residual = add_rms_norm(x, residual)    # residual <- x + residual
              h = attn(h)                                # rotary_store_kv inside
              h, residual = add_rms_norm(h, residual)
              x = mlp(h)                                 # silu_and_mul inside
    final:    out, _ = add_rms_norm(x, residual)

The wrappers read no device value on the host and allocate only their outputs, so they can
be captured in a CUDA graph. Triton's CPU interpreter gets bf16 wrong: on the CPU the
kernels are tested in fp32 and fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from loraserve.kernels.attention import store_kv
from loraserve.kernels.host import cdiv, next_power_of_2


def _use_triton(backend: str, x: Tensor) -> bool:
    """Whether backend ("auto": Triton on CUDA, torch elsewhere; "torch"; "triton") is Triton."""
    if backend == "auto":
        return x.is_cuda
    if backend in ("torch", "triton"):
        return backend == "triton"
    raise ValueError(f"unknown fused-kernel backend {backend!r}")


# ---------------------------------------------------------------- residual add + RMSNorm


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF Llama's RMSNorm: normalise in fp32, round to x's dtype, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    s = x if residual is None else x + residual
    return rms_norm_ref(s, weight, eps), s


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_sum,
    eps,
    H: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= H
    HAS_RESIDUAL: tl.constexpr,
):
    """One program per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        s = (s + r).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, s, mask=mask)
        s = s.to(tl.float32)
    var = tl.sum(s * s, axis=0) * (1.0 / H)  # as torch's CUDA mean
    h = (s * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm_triton(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    num_rows, hidden = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = x if residual is None else torch.empty_like(x)
    if num_rows == 0:
        return out, s
    res = x if residual is None else residual  # not read without a residual
    block = next_power_of_2(hidden)
    _add_rms_norm_kernel[(num_rows,)](
        x,
        res,
        weight,
        out,
        s,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        s.stride(0),
        eps,
        H=hidden,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 256, 1), 8),
    )
    return out, s


def fused_add_rms_norm(
    x: Tensor,  # [T, H], model dtype
    residual: Tensor | None,  # [T, H], model dtype; None: no add (s = x)
    weight: Tensor,  # [H]
    eps: float,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # out [T, H], s [T, H] (the new residual stream)
    """s = x + residual, rounded to the model dtype; out = RMSNorm(s) as HF computes it."""
    if _use_triton(backend, x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


# ---------------------------------------------------------------- rotary + KV store


def apply_rotary_ref(
    positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """HF's non-interleaved RoPE (rotate_half), the tables cast to the model dtype first.

    positions [T]; q [T, heads, head_dim]; k [T, kv_heads, head_dim]; cos, sin fp32
    [max_positions, head_dim // 2]
    """
    cos = cos[positions].repeat(1, 2).unsqueeze(1).to(q.dtype)  # [T, 1, head_dim]
    sin = sin[positions].repeat(1, 2).unsqueeze(1).to(q.dtype)
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def _rotate_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _split_qkv(qkv: Tensor, num_heads: int, k_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Views q [T, heads, head_dim], k and v [T, kv_heads, head_dim] of packed q|k|v rows."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    kv_size = num_kv_heads * head_dim
    q, k, v = qkv.split([num_heads * head_dim, kv_size, kv_size], dim=-1)
    return (
        q.unflatten(-1, (num_heads, head_dim)),
        k.unflatten(-1, (num_kv_heads, head_dim)),
        v.unflatten(-1, (num_kv_heads, head_dim)),
    )


def rotary_store_kv_ref(
    qkv: Tensor,
    positions: Tensor,
    cos: Tensor,
    sin: Tensor,
    slot_mapping: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    num_heads: int,
) -> Tensor:
    q, k, v = _split_qkv(qkv, num_heads, k_cache)
    q, k = apply_rotary_ref(positions, q, k, cos, sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to dtype, back in fp32 (a no-op for fp32)."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate(x_ptr, offs, mask, cos, sin, HALF: tl.constexpr):
    """Both halves of x * cos + rotate_half(x) * sin, fp32, each product rounded to x's dtype
    and the sum not yet rounded. offs: [rows, BLOCK_HALF] offsets of the first halves."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    first = _round(x1 * cos, dtype) - _round(x2 * sin, dtype)
    second = _round(x2 * cos, dtype) + _round(x1 * sin, dtype)
    return first, second


@triton.jit
def _rotary_store_kv_kernel(
    qkv_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    slot_mapping_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_qkv,
    stride_table,
    stride_k_page,
    stride_k_off,
    stride_k_head,
    stride_v_page,
    stride_v_off,
    stride_v_head,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of two >= NUM_HEADS
    BLOCK_KV: tl.constexpr,  # next power of two >= NUM_KV_HEADS
    BLOCK_HALF: tl.constexpr,  # next power of two >= HEAD_DIM // 2
):
    """One program per token: every q head rotated in place, every kv head into its slot."""
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype: tl.constexpr = qkv_ptr.dtype.element_ty
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok)
    slot = tl.load(slot_mapping_ptr + tok)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    cos = _round(tl.load(cos_ptr + pos * stride_table + d, mask=d_ok, other=0.0), dtype)[None, :]
    sin = _round(tl.load(sin_ptr + pos * stride_table + d, mask=d_ok, other=0.0), dtype)[None, :]
    row = qkv_ptr + tok * stride_qkv

    h = tl.arange(0, BLOCK_H)
    q_mask = (h < NUM_HEADS)[:, None] & d_ok[None, :]
    q_offs = h[:, None] * HEAD_DIM + d[None, :]  # [BLOCK_H, BLOCK_HALF]
    q1, q2 = _rotate(row, q_offs, q_mask, cos, sin, HALF)
    tl.store(row + q_offs, q1.to(dtype), mask=q_mask)
    tl.store(row + q_offs + HALF, q2.to(dtype), mask=q_mask)

    kvh = tl.arange(0, BLOCK_KV)
    kv_mask = (kvh < NUM_KV_HEADS)[:, None] & d_ok[None, :]
    kv_offs = kvh[:, None] * HEAD_DIM + d[None, :]  # [BLOCK_KV, BLOCK_HALF]
    k_row = row + NUM_HEADS * HEAD_DIM
    v_row = k_row + NUM_KV_HEADS * HEAD_DIM
    k1, k2 = _rotate(k_row, kv_offs, kv_mask, cos, sin, HALF)
    v1 = tl.load(v_row + kv_offs, mask=kv_mask)
    v2 = tl.load(v_row + kv_offs + HALF, mask=kv_mask)

    page, offset = slot // PAGE_SIZE, slot % PAGE_SIZE
    k_dst = k_cache_ptr + page * stride_k_page + offset * stride_k_off
    k_dst = k_dst + kvh[:, None] * stride_k_head + d[None, :]
    v_dst = v_cache_ptr + page * stride_v_page + offset * stride_v_off
    v_dst = v_dst + kvh[:, None] * stride_v_head + d[None, :]
    k_ty: tl.constexpr = k_cache_ptr.dtype.element_ty
    v_ty: tl.constexpr = v_cache_ptr.dtype.element_ty
    tl.store(k_dst, k1.to(dtype).to(k_ty), mask=kv_mask)
    tl.store(k_dst + HALF, k2.to(dtype).to(k_ty), mask=kv_mask)
    tl.store(v_dst, v1.to(v_ty), mask=kv_mask)
    tl.store(v_dst + HALF, v2.to(v_ty), mask=kv_mask)


def rotary_store_kv_triton(
    qkv: Tensor,
    positions: Tensor,
    cos: Tensor,
    sin: Tensor,
    slot_mapping: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    num_heads: int,
) -> Tensor:
    """Rotates q in place in qkv and returns it as a view [T, heads, head_dim]."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    q = qkv[:, : num_heads * head_dim].unflatten(-1, (num_heads, head_dim))
    if qkv.shape[0] == 0:
        return q
    _rotary_store_kv_kernel[(qkv.shape[0],)](
        qkv,
        positions,
        cos,
        sin,
        slot_mapping,
        k_cache,
        v_cache,
        qkv.stride(0),
        cos.stride(0),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=block_size,
        BLOCK_H=next_power_of_2(num_heads),
        BLOCK_KV=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(head_dim // 2),
        enable_fp_fusion=False,  # no a*b+c*d -> fma: each product rounded, as in torch
    )
    return q


def rotary_store_kv(
    qkv: Tensor,  # [T, (heads + 2 * kv_heads) * head_dim], q|k|v packed, last dim contiguous
    positions: Tensor,  # int64 [T]
    cos: Tensor,  # fp32 [max_positions, head_dim // 2], contiguous (RotaryEmbedding.cos)
    sin: Tensor,  # fp32 [max_positions, head_dim // 2]
    slot_mapping: Tensor,  # int64 [T], slot = page * block_size + offset, >= 0
    k_cache: Tensor,  # [num_pages, block_size, kv_heads, head_dim], a strided pool view
    v_cache: Tensor,  # [num_pages, block_size, kv_heads, head_dim]
    num_heads: int,
    backend: str = "auto",
) -> Tensor:  # q rotated [T, heads, head_dim]
    """RoPE on q and k; rotated k and plain v written into each token's KV slot.

    The Triton path rotates q in place in qkv and returns a view of it; the torch path
    returns a new tensor.
    """
    args = (qkv, positions, cos, sin, slot_mapping, k_cache, v_cache, num_heads)
    if _use_triton(backend, qkv):
        return rotary_store_kv_triton(*args)
    return rotary_store_kv_ref(*args)


# ---------------------------------------------------------------- SiLU gate


def silu_and_mul_ref(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, inter, BLOCK: tl.constexpr):
    """Program (row, block of BLOCK columns)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=mask, other=0.0)
    silu = _round(gate / (1.0 + tl.exp(-gate)), dtype)  # torch's formula, rounded as F.silu
    tl.store(out_ptr + row * stride_out + cols, (silu * up.to(tl.float32)).to(dtype), mask=mask)


def silu_and_mul_triton(gate_up: Tensor) -> Tensor:
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return out
    block = min(1024, next_power_of_2(inter))
    grid = (num_rows, cdiv(inter, block))
    _silu_and_mul_kernel[grid](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
    )
    return out


def silu_and_mul(
    gate_up: Tensor,  # [T, 2 * I], gate|up packed, last dim contiguous
    backend: str = "auto",
) -> Tensor:  # [T, I]
    """silu(gate) * up, rounded as torch rounds F.silu(gate) * up in the model dtype."""
    if _use_triton(backend, gate_up):
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_ref(gate_up)
