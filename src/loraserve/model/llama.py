"""One Llama-family model: Llama 2/3 (GQA, llama3 RoPE), Mistral, Qwen2 (qkv bias),
SmolLM2 (tied embeddings). Plain PyTorch, read top to bottom; attention reads and writes
the paged KV cache in the shared page pool.

Checkpoint names -> modules (HF layout):
    model.embed_tokens.weight                       -> embed_tokens
    model.layers.{i}.self_attn.{q,k,v}_proj.*       -> layers[i].attn.qkv  (packed)
    model.layers.{i}.self_attn.o_proj.weight        -> layers[i].attn.o_proj
    model.layers.{i}.mlp.{gate,up}_proj.weight      -> layers[i].mlp.gate_up (packed)
    model.layers.{i}.mlp.down_proj.weight           -> layers[i].mlp.down_proj
    model.layers.{i}.{input,post_attention}_layernorm.weight, model.norm.weight
    lm_head.weight (absent when tie_word_embeddings)

Each residual add is fused into the RMSNorm after it (vLLM style): a layer takes the previous
layer's output and the residual stream before it, and returns the same pair.

    x, residual = embed, None
    layer:  h, residual = input_layernorm(x, residual)           # residual += x
            h, residual = post_attention_layernorm(attn(h), residual)
            x = mlp(h)
    final:  norm(x, residual)

Per layer, on CUDA: 2 x add+RMSNorm, rotary+KV store, silu*mul (kernels/fused.py), besides
the matmuls, LoRA and attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.config import ModelConfig
from loraserve.kernels.attention import paged_attention
from loraserve.kernels.fused import rotary_store_kv, silu_and_mul
from loraserve.model.batch import ForwardBatch
from loraserve.model.layers import PackedLinear, RMSNorm
from loraserve.model.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv = PackedLinear(
            config.hidden_size,
            {"q_proj": config.q_size, "k_proj": config.kv_size, "v_proj": config.kv_size},
            bias=config.qkv_bias,
            layer=layer_idx,
        )
        self.o_proj = PackedLinear(
            config.q_size, {"o_proj": config.hidden_size}, config.o_bias, layer=layer_idx
        )
        self.rotary = rotary
        self.backend = "auto"
        self.k_cache: torch.Tensor | None = None  # [num_pages, block_size, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # x [T, hidden]
        q = rotary_store_kv(
            self.qkv(x, batch.lora),
            batch.positions,
            self.rotary.cos,
            self.rotary.sin,
            batch.slot_mapping,
            self.k_cache,
            self.v_cache,
            self.num_heads,
            backend=self.backend,
        )  # [T, heads, head_dim]; K and V of the batch's tokens are in the cache
        o = self._attend(q, batch)  # [T, heads, head_dim]
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim), batch.lora)

    def _attend(self, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Paged attention of every query row; a mixed step's decode sequences (the first
        ``num_decode_seqs``) in a launch of their own. Both launches index rows absolutely
        (query_start_loc), so they write disjoint rows of one output."""
        kv = (self.k_cache, self.v_cache)
        d = batch.num_decode_seqs
        if not 0 < d < batch.num_seqs:
            return paged_attention(
                q,
                *kv,
                batch.block_tables,
                batch.seq_lens,
                batch.query_start_loc,
                self.scale,
                backend=self.backend,
                max_q_len=batch.max_q_len,
                max_seq_len=batch.max_seq_len,
                tile_map=batch.attn_tiles,
            )
        out = torch.empty_like(q)
        # (block tables, sequence lengths, query starts, max_q_len) of each part
        decode = (batch.block_tables[:d], batch.seq_lens[:d], batch.query_start_loc[: d + 1], 1)
        prefill = batch.prefill_part or (
            batch.block_tables[d:],
            batch.seq_lens[d:],
            batch.query_start_loc[d:],
        )
        for *tensors, max_q_len in (decode, (*prefill, batch.max_q_len)):
            paged_attention(
                q,
                *kv,
                *tensors,
                self.scale,
                backend=self.backend,
                max_q_len=max_q_len,
                max_seq_len=batch.max_seq_len,
                out=out,
            )
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        inter = config.intermediate_size
        bias = config.mlp_bias
        self.gate_up = PackedLinear(
            config.hidden_size, {"gate_proj": inter, "up_proj": inter}, bias, layer=layer_idx
        )
        self.down_proj = PackedLinear(
            inter, {"down_proj": config.hidden_size}, bias, layer=layer_idx
        )
        self.backend = "auto"  # of silu_and_mul

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = silu_and_mul(self.gate_up(x, batch.lora), backend=self.backend)  # [T, inter]
        return self.down_proj(h, batch.lora)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_idx)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: the previous layer's output [T, hidden]; residual: the stream before it, or None
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.attn(h, batch), residual)
        return self.mlp(h, batch), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Parameter(
                torch.empty(config.vocab_size, config.hidden_size), requires_grad=False
            )

    def set_lora_stream(self, stream: torch.cuda.Stream | None) -> None:
        """Run every packed linear layer's LoRA shrink on ``stream`` beside its base GEMM
        (None: on the current stream, after it)."""
        for module in self.modules():
            if isinstance(module, PackedLinear):
                module.lora_stream = stream

    def bind_kv_cache(self, kv: torch.Tensor, backend: str = "auto") -> None:
        """kv: the pool viewed as [num_pages, num_layers, 2, block_size, kv_heads, head_dim].
        backend: of attention and the fused kernels ("auto": Triton on CUDA)."""
        for i, layer in enumerate(self.layers):
            layer.attn.k_cache = kv[:, i, 0]
            layer.attn.v_cache = kv[:, i, 1]
            for module in (
                layer.input_layernorm,
                layer.attn,
                layer.post_attention_layernorm,
                layer.mlp,
            ):
                module.backend = backend
        self.norm.backend = backend

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states after the final norm, only for ``batch.logits_indices`` rows."""
        x, residual = self.embed_tokens(batch.input_ids), None  # [T, hidden]
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        rows = batch.logits_indices
        return self.norm(x[rows], residual[rows])[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [N, hidden] -> logits [N, vocab] fp32
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        return F.linear(hidden, weight).float()
