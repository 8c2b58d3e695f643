"""Benchmark the paged attention kernel on the GPU: decode and prefill, bf16.

The KV cache is a strided view into a pool laid out like the engine's
([num_pages, num_layers, 2, block_size, kv_heads, head_dim]) with scattered pages. Each case
is timed with triton.testing.do_bench (median) and reported as microseconds and achieved
GB/s (KV bytes read + q read + out written) against the H200's 4.26 TB/s; prefill also
reports TFLOP/s of the causal attention matmuls.

Split-KV decode (small batches, long contexts): each (batch, context) is timed without
splits, with the num_splits the kernel picks (num_kv_splits, max_seq_len = context) and with
every num_splits of --split-sweep; a summary table gives the speedups and the best count.

    python benchmarks/bench_attention.py --out bench_attention.json
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass

import torch
import triton
import triton.testing

from loraserve.kernels.attention import (
    num_kv_splits,
    paged_attention_ref,
    paged_attention_triton,
    store_kv,
)

logger = logging.getLogger("bench_attention")

PEAK_BYTES_PER_S = 4.26e12  # measured H200 copy rate; the spec sheet says 4.8 TB/s
PEAK_FLOP_PER_S = 989e12  # dense bf16 tensor-core peak
HEAD_SHAPES = {"llama7b": (32, 32, 128), "gqa32x8": (32, 8, 128)}  # heads, kv_heads, head_dim


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_pages, block_size, kv_heads, head_dim], strided view
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    scale: float
    max_q_len: int

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


@dataclass
class Result:
    phase: str
    shape: str
    batch: int
    context: int
    q_len: int
    us: float
    gb_per_s: float
    bandwidth_util: float
    tflop_per_s: float
    num_splits: int | None = None  # split-KV decode; None: the single-kernel path


def make_batch(
    seq_lens: list[int],
    q_lens: list[int],
    heads: tuple[int, int, int],
    block_size: int,
    num_layers: int,
    dtype: torch.dtype,
) -> Batch:
    """A batch whose pages are scattered over a pool of num_layers layers (uses the last)."""
    num_heads, kv_heads, head_dim = heads
    blocks = [-(-n // block_size) for n in seq_lens]
    num_pages = sum(blocks) + 1
    pool_shape = (num_pages, num_layers, 2, block_size, kv_heads, head_dim)
    pool = torch.empty(pool_shape, dtype=dtype, device="cuda").normal_()
    perm = torch.randperm(num_pages, device="cuda").to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for s, n in enumerate(blocks):
        tables[s, :n] = perm[used : used + n]
        used += n
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype, device="cuda")
    return Batch(
        q=q,
        k_cache=pool[:, num_layers - 1, 0],
        v_cache=pool[:, num_layers - 1, 1],
        block_tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        query_start_loc=cu.cuda(),
        scale=head_dim**-0.5,
        max_q_len=max(q_lens),
    )


def traffic(batch: Batch) -> tuple[int, float]:
    """(bytes moved, causal matmul FLOPs) of one call."""
    num_tokens, num_heads, head_dim = batch.q.shape
    kv_heads = batch.k_cache.shape[2]
    elem = batch.q.element_size()
    seq_lens = batch.seq_lens.tolist()
    q_lens = (batch.query_start_loc[1:] - batch.query_start_loc[:-1]).tolist()
    kv_bytes = sum(seq_lens) * 2 * kv_heads * head_dim * elem
    q_out_bytes = 2 * num_tokens * num_heads * head_dim * elem
    # query j of a sequence sees (seq_len - q_len + j + 1) keys; QK^T and PV are 2 FLOPs a MAC
    keys_seen = sum(m * (n - m) + m * (m + 1) / 2 for n, m in zip(seq_lens, q_lens, strict=True))
    flops = 4.0 * keys_seen * num_heads * head_dim
    return kv_bytes + q_out_bytes, flops


def time_batch(
    batch: Batch, phase: str, shape: str, context: int, q_len: int, num_splits: int | None = None
) -> Result:
    def call() -> torch.Tensor:
        return paged_attention_triton(
            *batch.args(), out=out, max_q_len=batch.max_q_len, num_splits=num_splits
        )

    out = torch.empty_like(batch.q)
    ms = triton.testing.do_bench(call, return_mode="median")
    nbytes, flops = traffic(batch)
    gb_per_s = nbytes / (ms * 1e-3) / 1e9
    return Result(
        phase=phase,
        shape=shape,
        batch=batch.seq_lens.shape[0],
        context=context,
        q_len=q_len,
        us=ms * 1e3,
        gb_per_s=gb_per_s,
        bandwidth_util=gb_per_s * 1e9 / PEAK_BYTES_PER_S,
        tflop_per_s=flops / (ms * 1e-3) / 1e12,
        num_splits=num_splits,
    )


def max_error(dtype: torch.dtype, block_size: int, num_splits: int | None = None) -> float:
    """Max abs error of the kernel vs the reference on a small mixed batch, or on a decode
    batch through split-KV when num_splits is given."""
    torch.manual_seed(0)
    seq_lens, q_lens = [37, 300, 129, 1000], [1, 300, 17, 1]
    if num_splits is not None:
        seq_lens, q_lens = [37, 3000, 129, 1000, 1], [1] * 5
    batch = make_batch(seq_lens, q_lens, HEAD_SHAPES["gqa32x8"], block_size, 2, dtype)
    got = paged_attention_triton(*batch.args(), max_q_len=max(q_lens), num_splits=num_splits)
    want = paged_attention_ref(*batch.args())
    return (got.float() - want.float()).abs().max().item()


def check_store_kv(block_size: int) -> None:
    """store_kv on the GPU: a token written through a strided view reads back."""
    batch = make_batch([block_size + 3], [1], HEAD_SHAPES["gqa32x8"], block_size, 2, torch.bfloat16)
    k = torch.randn(1, *batch.k_cache.shape[2:], dtype=torch.bfloat16, device="cuda")
    slot = batch.block_tables[0, 1].long() * block_size + 2
    store_kv(k, k, batch.k_cache, batch.v_cache, slot.view(1))
    assert torch.equal(batch.k_cache[slot // block_size, 2], k[0])


def split_decode(args: argparse.Namespace, results: list[Result]) -> list[dict]:
    """Decode with and without split-KV; appends every timing to results, returns a summary."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    summary = []
    for shape, heads in HEAD_SHAPES.items():
        for context in args.split_contexts:
            for bs in args.split_batches:
                batch = make_batch([context] * bs, [1] * bs, heads, args.block_size, 2, args.dtype)
                auto = num_kv_splits(bs, heads[1], context, num_sms)
                base = time_batch(batch, "decode", shape, context, 1)
                split = {
                    n: time_batch(batch, "split", shape, context, 1, n) for n in args.split_sweep
                }
                if auto > 1 and auto not in split:
                    split[auto] = time_batch(batch, "split", shape, context, 1, auto)
                results += [base, *split.values()]
                best = min(split.values(), key=lambda r: r.us)
                auto_us = split[auto].us if auto > 1 else base.us
                summary.append(
                    dict(
                        shape=shape,
                        batch=bs,
                        context=context,
                        no_split_us=base.us,
                        no_split_gb_per_s=base.gb_per_s,
                        auto_splits=auto,
                        auto_us=auto_us,
                        auto_gb_per_s=base.gb_per_s * base.us / auto_us,
                        best_splits=best.num_splits,
                        best_us=best.us,
                    )
                )
                logger.info("%s", summary[-1])
                del batch
    return summary


def run(args: argparse.Namespace) -> dict:
    results: list[Result] = []
    for shape, heads in HEAD_SHAPES.items():
        for context in args.contexts:
            for bs in args.batches:
                batch = make_batch([context] * bs, [1] * bs, heads, args.block_size, 2, args.dtype)
                results.append(time_batch(batch, "decode", shape, context, 1))
                logger.info("%s", results[-1])
                del batch
        for prompt in args.prefill_lens:
            num = args.prefill_batch
            batch = make_batch(
                [prompt] * num, [prompt] * num, heads, args.block_size, 2, args.dtype
            )
            results.append(time_batch(batch, "prefill", shape, prompt, prompt))
            logger.info("%s", results[-1])
            del batch
    split_summary = split_decode(args, results)
    check_store_kv(args.block_size)
    errors = {str(dt): max_error(dt, args.block_size) for dt in (torch.bfloat16, torch.float16)}
    for dt in (torch.bfloat16, torch.float16):
        errors[f"{dt} split-KV x7"] = max_error(dt, args.block_size, num_splits=7)
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "block_size": args.block_size,
        "dtype": str(args.dtype),
        "peak_gb_per_s": PEAK_BYTES_PER_S / 1e9,
        "max_abs_error_vs_ref": errors,
        "results": [asdict(r) for r in results],
        "split_kv_decode": split_summary,
    }


def print_table(report: dict) -> None:
    header = (
        f"{'phase':8}{'shape':10}{'batch':>6}{'ctx':>6}{'splits':>7}{'us':>10}{'GB/s':>9}"
        f"{'%BW':>6}{'TF/s':>8}"
    )
    print(header)
    for r in report["results"]:
        splits = "-" if r["num_splits"] is None else r["num_splits"]
        print(
            f"{r['phase']:8}{r['shape']:10}{r['batch']:>6}{r['context']:>6}{splits:>7}"
            f"{r['us']:>10.1f}{r['gb_per_s']:>9.0f}{100 * r['bandwidth_util']:>5.0f}%"
            f"{r['tflop_per_s']:>8.1f}"
        )
    print("\nsplit-KV decode: no split vs the kernel's choice vs the best of the sweep")
    print(
        f"{'shape':10}{'batch':>6}{'ctx':>6}{'none us':>9}{'GB/s':>7}{'auto':>6}{'us':>9}"
        f"{'GB/s':>7}{'speedup':>8}{'best':>6}{'us':>9}"
    )
    for r in report["split_kv_decode"]:
        print(
            f"{r['shape']:10}{r['batch']:>6}{r['context']:>6}{r['no_split_us']:>9.1f}"
            f"{r['no_split_gb_per_s']:>7.0f}{r['auto_splits']:>6}{r['auto_us']:>9.1f}"
            f"{r['auto_gb_per_s']:>7.0f}{r['no_split_us'] / r['auto_us']:>7.2f}x"
            f"{r['best_splits']:>6}{r['best_us']:>9.1f}"
        )
    print(f"max abs error vs reference: {report['max_abs_error_vs_ref']}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench_attention.json", help="where to write the JSON report")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--prefill-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--split-batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--split-contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--split-sweep", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.bfloat16)
    return p.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    report = run(args)
    print_table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
