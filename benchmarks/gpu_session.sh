#!/bin/bash
# The GPU measurements still owed to docs/benchmarks.md, for the lent H200, in priority order.
#
#   bash benchmarks/gpu_session.sh parity attention lora_bf16 profile128   # one device call
#   bash benchmarks/gpu_session.sh s2n2000                                 # another
#
# Each named part runs under its own time limit and writes under $OUT (at most 8 files come
# back from a device call: profiles are tarred). One device call may run 10 minutes: keep
# the parts of a call under ~9. Parts and their rough device minutes:
#   parity      fused kernels + Triton paths against HF/PEFT in fp32 on the GPU   (2)
#   s2n2000     S2, n=2000, R=40, loraserve and base on the same trace            (5)
#   s1n2000     the same for S1                                                   (5)
#   profile128  profile_step.py at batch 128, with and without adapters           (2)
#   lora_bf16   Triton vs torch LoRA tokens in bf16, bank adapters                (1)
#   attention   split-KV vs one-pass decode attention                             (1)
#   s2n100      S2 n=100 R=10 120 s with base and PEFT                            (7)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
bench() { timeout "$1" python -m loraserve bench "${@:2}" --no-progress 2>&1 | grep -v Warning | tail -6; }

for part in "$@"; do
  echo "=== $part"
  case $part in
    parity)
      LORASERVE_TEST_DEVICE=cuda timeout 240 python -m pytest -q -x \
        tests/engine/test_hf_parity.py tests/engine/test_lora_parity.py 2>&1 | tail -4 ;;
    s2n2000|s1n2000)
      s=$(echo "${part:0:2}" | tr a-z A-Z)
      bench 330 --setting "$s" -n 2000 --rate 40 --duration 60 --baselines base \
        --time-limit 100 --out "$OUT/bench_${s}_n2000_r40.json" ;;
    profile128)
      timeout 200 python benchmarks/profile_step.py --model llama-7b --batches 128 \
        --context 256 --steps 20 --out-dir "$OUT/prof" 2>&1 | grep '^{'
      tar czf "$OUT/prof128.tgz" -C "$OUT" prof && rm -r "$OUT/prof" ;;
    lora_bf16)
      timeout 120 python benchmarks/lora_engine_check.py --model llama-7b -n 100 --batch 32 \
        --prompt-len 64 --new-tokens 16 --backends triton,torch,base \
        --out "$OUT/lora_check_bf16.json" 2>&1 | tail -5 ;;
    attention)
      timeout 120 python benchmarks/bench_attention.py 2>&1 | tail -30 ;;
    s2n100)
      bench 420 --setting S2 -n 100 --duration 120 --baselines base,peft --peft-batch 32 \
        --peft-time-limit 120 --time-limit 150 --out "$OUT/bench_S2_n100_120s.json" ;;
    *) echo "unknown part $part" ;;
  esac
done
