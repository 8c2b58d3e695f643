"""The LoRA, attention and fused kernels compiled for an H100/H200 (sm_90, no GPU needed) load
bf16 in 16-byte vectors. A K bound the compiler could not prove aligned (an unspecialised int in it)
made the shrink kernels load one bf16 at a time: half speed on the H200 (GPU session 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def memory_ops():
    # Compiled in a process of its own: here TRITON_INTERPRET=1 makes every kernel an
    # interpreter function, which the compiler does not take.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    script = ROOT / "benchmarks" / "kernel_ptx.py"
    done = subprocess.run(
        [sys.executable, str(script), "--json"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        if "ptxas" in done.stderr or "backend" in done.stderr.lower():
            pytest.skip(f"no sm_90 compiler here: {done.stderr[-300:]}")
        raise AssertionError(done.stderr[-3000:])
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "name",
    [
        "_shrink_decode_kernel",
        "_shrink_decode_staged",
        "_shrink_decode_dense",
        "_shrink_prefill_kernel",
        "_expand_decode_kernel",
        "_expand_decode_packed",
        "_fused_decode",
        "_fused_decode_r16",
        "_expand_prefill_kernel",
        "_shrink_grouped",
        "_expand_grouped",
        "_paged_decode_split_kernel",
        "_paged_attention_kernel",
        "_add_rms_norm_kernel",
        "_silu_and_mul_kernel",
    ],
)
def test_kernels_load_16_byte_vectors(memory_ops, name):
    ops = memory_ops[name]
    assert ops.get("ld.global.b16", 0) == 0, ops  # no scalar bf16 loads
    assert ops.get("ld.global.v4.b32", 0) + ops.get("cp.async.16B", 0) > 0, ops
