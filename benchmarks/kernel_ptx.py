"""Compile the Triton kernels for an H100/H200 (sm_90) on a machine without a GPU and count
their global load and store instructions by width: a scalar ``ld.global.b16`` where a
``ld.global.v4.b32`` (8 bf16 at once) was meant shows a kernel whose bounds the compiler
cannot prove aligned (GPU session 6: the decode shrink ran at half speed for that).

    python benchmarks/kernel_ptx.py                 # every kernel, a typical 7B call
    python benchmarks/kernel_ptx.py --show _shrink_decode_kernel   # its PTX
    python benchmarks/kernel_ptx.py --ptxas         # registers and spills (sm_90a)

Arguments are specialised as Triton does at a real call: pointers and ints divisible by 16
marked so, unit strides folded to 1, ints the kernel exempts (do_not_specialize) left
unknown. Needs only the triton package (it bundles ptxas).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraserve.kernels import attention, fused, lora

# Pointer element types by argument name (bf16 activations and pool, fp32 partials).
_FP32_PTRS = {"v_ptr", "scalings_ptr", "acc_ptr", "m_ptr", "l_ptr"}
_I64_PTRS = {"row_offsets_ptr"}
_BF16_PTRS = {"x_ptr", "y_ptr", "pool_ptr", "q_ptr", "k_ptr", "out_ptr", "res_ptr", "w_ptr"}
_BF16_PTRS |= {"sum_ptr", "gate_up_ptr"}
_UNIT_STRIDES = {"stride_x_k", "stride_y_n"}
_FLOATS = {"scale_log2", "eps"}

# (kernel, constexprs, num_warps): a 7B q|k|v LoRA call at rank 64 (rank 16 for the dense
# shrink and the packed expand, as the engine picks them) with the decode defaults of GPU
# session 9, and paged attention.
KERNELS = {
    "_shrink_decode_kernel": (
        lora._shrink_decode_kernel,
        dict(N_TARGETS=3, R_PAD=64, ROW_ALIGN=8, BLOCK_C=16, BLOCK_K=512, DENSE=False),
        2,
    ),
    "_shrink_decode_staged": (  # the K loop pipelined by the compiler (shrink_stages)
        lora._shrink_decode_kernel,
        dict(N_TARGETS=3, R_PAD=64, ROW_ALIGN=8, BLOCK_C=16, BLOCK_K=512, DENSE=False, STAGES=3),
        2,
    ),
    "_shrink_decode_dense": (
        lora._shrink_decode_kernel,
        dict(N_TARGETS=3, R_PAD=16, ROW_ALIGN=8, BLOCK_C=16, BLOCK_K=512, DENSE=True),
        2,
    ),
    "_shrink_prefill_kernel": (
        lora._shrink_prefill_kernel,
        dict(
            N_TARGETS=3,
            R_PAD=64,
            ROW_ALIGN=8,
            BLOCK_M=64,
            BLOCK_C=128,
            BLOCK_K=64,
            DOT_PRECISION="tf32",
            TILE_MAP=False,
            PERSISTENT=False,
        ),
        8,
    ),
    # grouped decode rows (the decode graphs): 16-row tiles over a persistent tile map
    "_shrink_grouped": (
        lora._shrink_prefill_kernel,
        dict(
            N_TARGETS=3,
            R_PAD=64,
            ROW_ALIGN=8,
            BLOCK_M=16,
            BLOCK_C=128,
            BLOCK_K=64,
            DOT_PRECISION="tf32",
            TILE_MAP=True,
            PERSISTENT=True,
        ),
        4,
    ),
    "_expand_decode_kernel": (
        lora._expand_decode_kernel,
        dict(R_PAD=64, ROW_ALIGN=8, BLOCK_S=32, BLOCK_R=64, BLOCK_N=512),
        2,
    ),
    "_expand_decode_packed": (  # the default with max_lora_rank <= 16
        lora._expand_decode_kernel,
        dict(R_PAD=16, ROW_ALIGN=8, BLOCK_S=32, BLOCK_R=16, BLOCK_N=512, RANK_PACK=True),
        2,
    ),
    "_fused_decode": (  # --lora-fused-decode at rank 8 (S1)
        lora._fused_decode_kernel,
        dict(ROW_ALIGN=8, BLOCK_R=8, BLOCK_K=512, BLOCK_N=512, STAGES=3),
        2,
    ),
    "_fused_decode_r16": (  # ... in tables for rank 16: two tile shapes (8 and 16 rows)
        lora._fused_decode_kernel,
        dict(ROW_ALIGN=8, BLOCK_R=16, BLOCK_K=512, BLOCK_N=512, STAGES=3, RANK_CLASSES=2),
        2,
    ),
    "_expand_prefill_kernel": (
        lora._expand_prefill_kernel,
        dict(
            R_PAD=64,
            ROW_ALIGN=8,
            BLOCK_M=32,
            BLOCK_R=32,
            BLOCK_N=128,
            DOT_PRECISION="tf32",
            TILE_MAP=False,
            PERSISTENT=False,
        ),
        4,
    ),
    "_expand_grouped": (
        lora._expand_prefill_kernel,
        dict(
            R_PAD=64,
            ROW_ALIGN=8,
            BLOCK_M=16,
            BLOCK_R=32,
            BLOCK_N=128,
            DOT_PRECISION="tf32",
            TILE_MAP=True,
            PERSISTENT=True,
        ),
        4,
    ),
    # Llama-7B attention (32 heads of 128, no GQA), 16-token pages.
    "_paged_decode_split_kernel": (
        attention._paged_decode_split_kernel,
        dict(
            HEAD_DIM=128,
            PAGE_SIZE=16,
            GROUP=1,
            BLOCK_M=16,
            BLOCK_N=64,
            BLOCK_D=128,
            DOT_PRECISION="tf32",
            SPLIT_UNIT=64,
        ),
        4,
    ),
    "_paged_attention_kernel": (
        attention._paged_attention_kernel,
        dict(
            HEAD_DIM=128,
            PAGE_SIZE=16,
            GROUP=1,
            BLOCK_M=64,
            BLOCK_N=64,
            BLOCK_D=128,
            DOT_PRECISION="tf32",
            TILE_MAP=False,
        ),
        4,
    ),
    # The per-layer fused kernels (7B: hidden 4096, intermediate 11008).
    "_add_rms_norm_kernel": (
        fused._add_rms_norm_kernel,
        dict(H=4096, BLOCK=4096, HAS_RESIDUAL=True),
        8,
    ),
    "_silu_and_mul_kernel": (fused._silu_and_mul_kernel, dict(BLOCK=1024), 4),
}
_ATTENTION = (attention._paged_decode_split_kernel, attention._paged_attention_kernel)


def _signature(fn, constexprs: dict) -> tuple[dict, dict, dict]:
    sig, consts, attrs = {}, {}, {}
    skip = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        if name in constexprs or (param.is_constexpr and param.has_default):
            sig[name] = "constexpr"  # a constexpr left out takes its default
            consts[(i,)] = constexprs.get(name, param.default)
        elif name in _UNIT_STRIDES:
            sig[name] = "constexpr"
            consts[(i,)] = 1
        elif name.endswith("_ptr"):
            if name in _BF16_PTRS or (name == "v_ptr" and fn in _ATTENTION):
                kind = "bf16"  # the attention kernels' V cache (LoRA's v_ptr: fp32 partials)
            elif name in _FP32_PTRS:
                kind = "fp32"
            else:
                kind = "i64" if name in _I64_PTRS else "i32"
            sig[name] = "*" + kind
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in skip:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_ptx(name: str) -> str:
    fn, constexprs, warps = KERNELS[name]
    sig, consts, attrs = _signature(fn, constexprs)
    src = ASTSource(fn, sig, consts, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return kernel.asm["ptx"]


def memory_ops(ptx: str) -> Counter:
    """Global loads/stores by width, and asynchronous global -> shared copies by bytes."""
    ops = Counter(re.findall(r"(?:ld|st)\.global[\w.]*", ptx))
    for size in re.findall(r"cp\.async\.\w+\.shared\.global[^;]*?, (0x[0-9a-f]+|\d+)", ptx):
        ops[f"cp.async.{int(size, 0)}B"] += 1
    return ops


def ptxas_report(ptx: str) -> str:
    """Registers and spills of a kernel's PTX as the ptxas bundled with triton reports them
    for sm_90a (the newest of its ptxas binaries: it must read the PTX's version). The
    GPU's own toolchain may allocate differently: a guide, not a measurement."""
    bins = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = max(bins.glob("ptxas*"), key=lambda p: len(p.name))  # ptxas-blackwell if there
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln.split("info    :")[-1].strip() for ln in done.stderr.splitlines()]
    keep = [ln for ln in lines if "registers" in ln or "spill" in ln]
    return "; ".join(keep) or done.stderr.strip()[-300:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--show", default=None, help="print this kernel's PTX")
    p.add_argument("--json", action="store_true", help="counts as JSON, by kernel")
    p.add_argument("--ptxas", action="store_true", help="registers and spills, by kernel")
    args = p.parse_args(argv)
    if args.ptxas:
        for name in KERNELS:
            print(f"{name:26} {ptxas_report(compile_ptx(name))}")
        return 0
    if args.show:
        sys.stdout.write(compile_ptx(args.show))
        return 0
    if args.json:
        counts = {name: dict(memory_ops(compile_ptx(name))) for name in KERNELS}
        sys.stdout.write(json.dumps(counts) + "\n")
        return 0
    for name in KERNELS:
        ops = memory_ops(compile_ptx(name))
        print(f"{name:26} " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
