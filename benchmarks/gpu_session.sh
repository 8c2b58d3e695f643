#!/bin/bash
# The GPU measurements still owed to docs/benchmarks.md, for the lent H200, in priority order.
#
#   bash benchmarks/gpu_session.sh parity profile_mixed      # one device call
#   bash benchmarks/gpu_session.sh s2n2000                   # another
#   bash benchmarks/gpu_session.sh table_S2_5,100            # S2 at n=5,100: base, PEFT
#
# Each named part runs under its own time limit and writes under $OUT (at most 8 files come
# back from a device call: profiles are tarred). One device call may run 10 minutes: keep
# the parts of a call under ~9. Parts and their rough device minutes:
#   parity      fused kernels + Triton paths against HF/PEFT in fp32 on the GPU, CUDA
#               graphs, overlapped decode steps, pinned input upload              (5)
#   s2n2000     S2, n=2000, R=40, loraserve and base on one 50 s trace cut at 70 s, with
#               the decode probe after loraserve's run                           (5)
#   s1n2000     the same for S1                                                   (4.5)
#   probe       bench/probe.py at S2's and S1's n=2000 decode batches: LoRA's extra step
#               time with and without adapters on one engine                    (3)
#   s2n2000_sat, s1n2000_sat  the same at R=60 for 60 s, cut at 60 s: arrivals outrun both
#               engines (base's saturated req/s is ~36), so req/s is throughput  (4.5)
#   s2n2000_sat_pf, s1n2000_sat_pf  ... and --adapter-prefetch 64 beside the default (6)
#   s2n2000_sat_fused, s1n2000_sat_fused  ... and --no-lora-fused-decode beside the default (6)
#   s2n2000_ai  S2 n=2000 with --admission-interval 0.5 (loraserve and base)       (6)
#   s2n2000_split     ... with --mixed-decode-graphs 64                           (6)
#   s2n2000_ab  default, --mixed-decode-graphs 64, --no-overlap-steps and base, one
#               50 s trace cut at 70 s, one call (bench --variant)                (8)
#   s2n2000_nooverlap ... with --no-overlap-steps                                 (6)
#   s2n2000_pg  default vs --prefill-graphs and base, one 50 s trace cut at 70 s     (6)
#   s2n2000_oa  default vs --overlap-admission and base, the same way                 (6)
#   s2n2000_group  default vs --no-group-lora-rows vs --lora-side-stream, and base     (7)
#   s2n2000_side   default vs --lora-side-stream, and base                        (6)
#   s2n2000_pack   default vs --lora-rank-pack vs --lora-side-stream, and base     (8)
#   overlap_tests  test_overlap.py and test_graphs.py on CUDA, output to a file      (2)
#   copy_wait   loads finished on their I/O thread while the engine waits (the default)
#               against --no-adapter-copy-in-wait: the CUDA tests, S2 n=2000 at R=10
#               and saturated, one trace each                                      (6)
#   gpu_tests   tests/kernels/test_lora.py and the graph-path engine tests on CUDA, output
#               to a file (over 5 min since session 15's fused tests)             (6-8)
#   probe_grouped  the probe at S4 n = 5's and a grouped S2 batch, the grouped K split
#               rule of session 14 against 13's                                  (4)
#   probe_fused the probe at S1's and S2's n = 2000 batches, with and without
#               --no-lora-fused-decode (SWEEP_PHASES=fused lora_sweep: the kernels alone)  (3)
#   probe_fused32  the probe with --lora-fused-max-rank 16, 32, 64: rank-32 rows and S2's  (5)
#   probe_rank  the probe at S1's batch, engines with --max-lora-rank 8, 16 and 64       (3)
#   probe_r32_small  rank-32 rows at 8, 32 and 224 rows, fused at 32 against two launches (1.5)
#   probe_s4_fused  S4 n = 5's batch: grouped, per row fused up to 64, per row two launches (2)
#   mixed_s1_width  mixed_s1's LoRA half on tables for 8 and 64, decode rows graphed and
#               eager: prompt rows' LoRA tiles at the server's default width            (3)
#   s1n10000    S1 with 10,000 adapters registered, 35 req/s for 90 s (~2,700 served)  (2.5)
#   probe_s1_side  the probe at S1's saturated batch, with and without --lora-side-stream (3)
#   profile128  profile_step.py at batch 128, with and without adapters           (2)
#   profile224  the same at batch 224, context 420 (S2 n=2000's decode steps)      (3)
#   profile_s1  batch 195, context 420, rank 8 only (S1 n=2000's decode steps)      (3)
#   lora_bf16   Triton vs torch LoRA tokens in bf16, bank adapters                (1)
#   attention   split-KV vs one-pass decode attention                             (1)
#   s2n100      S2 n=100 R=10 120 s with base and PEFT                            (7)
#   profile_mixed  batch 240 with adapters: decode and mixed (8 prompts) steps     (4)
#   mixed_s1, mixed_s2  base vs LoRA device time of a graphed decode step and a mixed
#               step (5 prompts x 430) at S1's / S2's saturated n=2000 batch    (3 / 9)
#   profile_mixed_split  the same with the mixed step's decode rows graphed         (4)
#   profile_io  batch 240 + 4 prompts: mixed steps with the adapter I/O threads idle, then
#               packing S2 adapters back to back: engine-thread contention?  (4; give
#               the device call a limit above 300 s: session 6's 300 s call ended empty)
#   peft_s2n100 S2 n=100 R=10, PEFT for 300 s (its first batches need minutes)     (6)
#   lora_sweep  bench_lora.py --sweep: block sizes one at a time, incl. n_group     (5)
#               (SWEEP_PHASES=small,s1 times only those phases' cases; SWEEP_TIMEOUT)
#   lora_tlb    LoRA kernels with rows in a compact pool vs spread over 100 GB, and a
#               batch-128 step with a 0.2 vs 0.8 memory pool: does reach cost?     (4)
#   overlap_ab  offline decode, batch 64 and 256, graphs with and without overlapped
#               steps (engine_throughput.py)                                      (4)
#   table_S_N[_ablation|_base|_group]  setting S at n in N (comma list), R=10, one 20 s trace
#               cut at 30 s, base and PEFT (n <= 100 only), one base run for the sweep; _ablation
#               adds padded (bmm) and separate adapter buffers at every n; _base: no PEFT;
#               _group: no PEFT, and --no-group-lora-rows beside the default  (~0.6 per run +
#               0.6 per engine start + 0.8 per PEFT point)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
bench() { timeout "$1" python -m loraserve bench "${@:2}" --no-progress 2>&1 | grep -v Warning | tail -40; }

for part in "$@"; do
  echo "=== $part"
  case $part in
    parity)  # no -x: every failure named in one call
      LORASERVE_TEST_DEVICE=cuda timeout 400 python -m pytest -q \
        tests/engine/test_hf_parity.py tests/engine/test_lora_parity.py \
        tests/engine/test_graphs.py tests/engine/test_overlap.py tests/engine/test_prepare.py \
        tests/engine/test_prefill_graphs.py \
        2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -15 ;;
    s2n2000_ab|s1n2000_ab)  # default, split, no overlap and base on one trace, one call
      s=$(echo "${part:0:2}" | tr a-z A-Z)
      bench 570 --setting "$s" -n 2000 --rate 40 --duration 50 --baselines base \
        --time-limit 70 --variant 'split=--mixed-decode-graphs 64' \
        --variant 'nooverlap=--no-overlap-steps' --out "$OUT/bench_${s}_n2000_r40_ab.json" ;;
    s2n2000_oa)  # steps that admit prompts queued ahead too (--overlap-admission), one trace
      bench 560 --setting S2 -n 2000 --rate 40 --duration 50 --baselines base \
        --time-limit 70 --variant 'oa=--overlap-admission' \
        --out "$OUT/bench_S2_n2000_r40_oa.json" ;;
    s2n2000_group)  # the default (grouped decode LoRA where rows share adapters) vs always a
      # segment per row, vs the LoRA shrink on a side stream, and base
      bench 570 --setting S2 -n 2000 --rate 40 --duration 50 --baselines base \
        --time-limit 70 --variant 'rows=--no-group-lora-rows' \
        --variant 'side=--lora-side-stream' --out "$OUT/bench_S2_n2000_r40_group.json" ;;
    s2n2000_side)  # the default against the LoRA shrink on a side stream, and base
      bench "${SIDE_TIMEOUT:-570}" --setting S2 -n 2000 --rate 40 --duration 50 --baselines base \
        --time-limit 70 --variant 'side=--lora-side-stream' \
        --out "$OUT/bench_S2_n2000_r40_side.json" ;;
    s2n2000_pack)  # the default against --lora-rank-pack and --lora-side-stream, and base
      bench "${PACK_TIMEOUT:-580}" --setting S2 -n 2000 --rate 40 --duration 50 --baselines base \
        --time-limit 70 --variant 'pack=--lora-rank-pack' --variant 'side=--lora-side-stream' \
        --out "$OUT/bench_S2_n2000_r40_pack.json" ;;
    overlap_tests)  # the overlapped-step and graph tests on CUDA, failures in full to a file
      LORASERVE_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT:-200}" python -m pytest -v --tb=short \
        --durations=15 tests/engine/test_overlap.py tests/engine/test_graphs.py \
        > "$OUT/overlap_tests.txt" 2>&1
      grep -E "FAILED|ERROR|passed|failed" "$OUT/overlap_tests.txt" | tail -8 ;;
    gpu_tests)  # the LoRA kernels (grouped, persistent grids) and the graph paths on CUDA
      # (session 15: 280 s covered test_lora.py, test_graphs.py and part of the next file)
      LORASERVE_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT:-480}" python -m pytest -q \
        tests/kernels/test_lora.py tests/engine/test_graphs.py tests/engine/test_prefill_graphs.py \
        tests/engine/test_overlap.py > "$OUT/gpu_tests.txt" 2>&1
      grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt" | tail -15 ;;
    copy_wait)  # session 18: AdapterManager.device_wait, on against off, one trace each
      LORASERVE_TEST_DEVICE=cuda timeout 120 python -m pytest -q tests/engine/test_adapter_io.py \
        tests/engine/test_overlap.py -k "device_wait or packed_while or copy_in_wait" 2>&1 \
        | grep -E "^(FAILED|ERROR)|passed|failed" | tail -8
      bench 200 --setting S2 -n 2000 --rate 10 --duration 20 --time-limit 30 \
        --variant 'nowait=--no-adapter-copy-in-wait' --out "$OUT/bench_S2_n2000_r10_wait.json"
      bench 330 --setting S2 -n 2000 --rate 60 --duration 60 --time-limit 60 \
        --variant 'nowait=--no-adapter-copy-in-wait' --out "$OUT/bench_S2_n2000_r60_wait.json" ;;
    s2n2000_pg)  # prompt rows as graph replays too (--prefill-graphs), on one trace
      bench 560 --setting S2 -n 2000 --rate 40 --duration 50 --baselines base \
        --time-limit 70 --variant 'pg=--prefill-graphs' \
        --out "$OUT/bench_S2_n2000_r40_pg.json" ;;
    s2n2000*|s1n2000*)
      s=$(echo "${part:0:2}" | tr a-z A-Z)
      extra=()  # variants (both runs), against the default:
      trace=(--rate 40 --duration 50 --time-limit 70)
      variant=()  # a loraserve variant beside the default, on the same trace
      case $part in
        *_sat) trace=(--rate 60 --duration 60 --time-limit 60) ;;  # both engines saturated
        *_sat_pf)  # the same, and a deeper adapter prefetch (admissions that wait for one)
          trace=(--rate 60 --duration 60 --time-limit 60)
          variant=(--variant 'pf64=--adapter-prefetch 64') ;;
        *_sat_fused)  # the same, and decode LoRA in two launches per call (before session 15)
          trace=(--rate 60 --duration 60 --time-limit 60)
          variant=(--variant 'two=--no-lora-fused-decode') ;;
        *_ai) extra=(--admission-interval 0.5) ;;  # admission interval 0.5 s
        *_split) extra=(--mixed-decode-graphs 64) ;;  # decode rows of mixed steps graphed
        *_nooverlap) extra=(--no-overlap-steps) ;;
      esac
      # the trace and cut of the documented S2/S1 n=2000 runs (sessions 8-10)
      bench 400 --setting "$s" -n 2000 "${trace[@]}" --baselines base --decode-probe \
        ${extra[@]+"${extra[@]}"} ${variant[@]+"${variant[@]}"} --out "$OUT/bench_${s}_n2000_r${trace[1]}${part:7}.json" ;;
    probe)  # LoRA's extra decode step time at S2's and S1's n=2000 batches, same engine
      timeout 200 python benchmarks/decode_probe.py --points 247x420x232,224x420x224 \
        --ranks 64,32,16,8 --out "$OUT/probe_s2.json" 2>&1 | grep -E '^(\{|engine)'
      timeout 200 python benchmarks/decode_probe.py --points 194x420x184 --ranks 8 \
        --out "$OUT/probe_s1.json" 2>&1 | grep -E '^(\{|engine)' ;;
    probe_grouped)  # grouped decode rows, the K split rule of session 14 against 13's: S4
      # n = 5's decode batch (13B, 29 rows on 5 adapters) and S2's rows on 52 adapters
      for old in "" --old-grouped-split; do
        timeout 150 python benchmarks/decode_probe.py --model llama-13b --points 29x260x5 \
          --ranks 64,32,16 $old --out "$OUT/probe_s4n5${old:+_old}.json" 2>&1 \
          | grep -E '^(\{|engine)'
        timeout 150 python benchmarks/decode_probe.py --points 256x420x52 --ranks 64,32,16,8 \
          $old --out "$OUT/probe_s2g52${old:+_old}.json" 2>&1 | grep -E '^(\{|engine)'
      done ;;
    probe_rank)  # S1's rank-8 batch on engines laid out for ranks up to 8 (the bench's, fused
      # decode), 16 and 64 (the server's default: two launches over 64-wide tables)
      for r in 8 16 64 64two; do
        two=(); if [ "$r" = 64two ]; then two=(--no-lora-fused-decode); fi
        timeout 100 python benchmarks/decode_probe.py --points 194x420x184 --ranks 8 \
          --max-lora-rank "${r%two}" ${two[@]+"${two[@]}"} --out "$OUT/probe_s1_max$r.json" 2>&1 \
          | grep -E '^(\{|engine)' | sed -E 's/, "(adapter_bytes|decode_ratio[a-z_]*|steps|context)": [0-9.e+-]+//g'
      done ;;
    probe_fused32)  # fused decode LoRA above rank 16 (--lora-fused-max-rank): rank-32 rows
      # (224 rows on 224 adapters) and S2's ranks 8-64, tables for 64, fused up to 16 (two
      # launches for these steps), 32 and 64
      for m in 16 32 64; do
        timeout 100 python benchmarks/decode_probe.py --points 224x420x224 --ranks 32 \
          --max-lora-rank 64 --lora-fused-max-rank $m --out "$OUT/probe_r32_fused$m.json" 2>&1 \
          | grep -E '^(\{|engine)' | sed -E 's/, "(adapter_bytes|decode_ratio[a-z_]*|steps|context)": [0-9.e+-]+//g'
        timeout 150 python benchmarks/decode_probe.py --points 224x420x224,251x420x92 \
          --ranks 64,32,16,8 --no-group-lora-rows \
          --lora-fused-max-rank $m --out "$OUT/probe_s2_fused$m.json" 2>&1 \
          | grep -E '^(\{|engine)' | sed -E 's/, "(adapter_bytes|decode_ratio[a-z_]*|steps|context)": [0-9.e+-]+//g'
      done ;;
    probe_r32_small)  # rank-32 rows at 8, 32 and 224 rows on their own adapters, tables for
      # 32: fused (--lora-fused-max-rank 32) against two launches (16, the default)
      for m in 16 32; do
        timeout 120 python benchmarks/decode_probe.py --points 8x260x8,32x260x32,224x420x224 \
          --ranks 32 --max-lora-rank 32 --lora-fused-max-rank $m --out "$OUT/probe_r32s_fused$m.json" 2>&1 \
          | grep -E '^(\{|engine)' | sed -E 's/, "(adapter_bytes|decode_ratio[a-z_]*|steps|context|seconds|[a-z_]*so_far)": [0-9.e+-]+//g'
      done ;;
    probe_s4_fused)  # S4 n = 5's decode batch (13B, 29 rows on 5 adapters, ranks 16-64):
      # grouped (default), per row fused up to rank 64, per row in two launches
      for v in grouped fused64 rows; do
        case $v in grouped) o=() ;; fused64) o=(--no-group-lora-rows --lora-fused-max-rank 64) ;;
          rows) o=(--no-group-lora-rows) ;; esac
        timeout 150 python benchmarks/decode_probe.py --model llama-13b --points 29x260x5 \
          --ranks 64,32,16 ${o[@]+"${o[@]}"} --out "$OUT/probe_s4n5_$v.json" 2>&1 \
          | grep -E '^(\{|engine)' | sed -E 's/, "(adapter_bytes|decode_ratio[a-z_]*|steps|context)": [0-9.e+-]+//g'
      done ;;
    probe_fused)  # LoRA's extra decode time, one launch per call (default; ranks <= 16)
      for f in "" --no-lora-fused-decode; do  # against two
        timeout 120 python benchmarks/decode_probe.py --points 194x420x184 --ranks 8 $f \
          --out "$OUT/probe_s1${f:+_two}.json" 2>&1 | grep -E '^(\{|engine)' | cut -c1-330
        timeout 120 python benchmarks/decode_probe.py --points 224x420x224 --ranks 64,32,16,8 \
          $f --out "$OUT/probe_s2${f:+_two}.json" 2>&1 | grep -E '^(\{|engine)' | cut -c1-330
      done ;;
    probe_s1_side)  # LoRA's extra decode time at S1's saturated batch, the shrink on the
      # base GEMM's stream (default) and on a side stream beside it (--lora-side-stream)
      for side in "" --lora-side-stream; do
        timeout 200 python benchmarks/decode_probe.py --points 238x431x224 --ranks 8 $side \
          --out "$OUT/probe_s1${side:+_side}.json" 2>&1 | grep -E '^(\{|engine)'
      done ;;
    profile128)
      timeout 200 python benchmarks/profile_step.py --model llama-7b --batches 128 \
        --context 256 --steps 20 --out-dir "$OUT/prof" 2>&1 | grep '^{'
      tar czf "$OUT/prof128.tgz" -C "$OUT" prof && rm -r "$OUT/prof" ;;
    profile_s1)  # S1 n=2000's decode batch: ~195 rows, one rank-8 adapter each (max rank 8)
      timeout 300 python benchmarks/profile_step.py --model llama-7b --batches 195 \
        --context 420 --steps 20 --ranks 8 --out-dir "$OUT/prof" 2>&1 | grep '^{'
      tar czf "$OUT/prof_s1.tgz" -C "$OUT" prof && rm -r "$OUT/prof" ;;
    profile224)  # S2 n=2000's decode batch: 224 distinct adapters of ranks 64/32/16/8
      timeout 300 python benchmarks/profile_step.py --model llama-7b --batches 224 \
        --context 420 --steps 20 --out-dir "$OUT/prof" 2>&1 | grep '^{'
      tar czf "$OUT/prof224.tgz" -C "$OUT" prof && rm -r "$OUT/prof" ;;
    lora_bf16)
      timeout 120 python benchmarks/lora_engine_check.py --model llama-7b -n 100 --batch 32 \
        --prompt-len 64 --new-tokens 16 --backends triton,torch,base \
        --out "$OUT/lora_check_bf16.json" 2>&1 | tail -5 ;;
    attention)
      timeout 120 python benchmarks/bench_attention.py 2>&1 | tail -30 ;;
    s2n100)
      bench 420 --setting S2 -n 100 --duration 120 --baselines base,peft --peft-batch 32 \
        --peft-time-limit 120 --time-limit 150 --out "$OUT/bench_S2_n100_120s.json" ;;
    profile_mixed|profile_mixed_split)
      split=(); if [[ $part == *_split ]]; then split=(--mixed-decode-graphs 64); fi
      timeout 300 python benchmarks/profile_step.py --model llama-7b --batches 240 --context 256 \
        --steps 10 --mixed-prompts 8 --scenarios lora "${split[@]}" --out-dir "$OUT/prof" \
        2>&1 | grep '^{'
      tar czf "$OUT/${part}.tgz" -C "$OUT" prof && rm -r "$OUT/prof" ;;
    mixed_s1|mixed_s2)  # LoRA's device time in a saturated run's decode and mixed steps:
      # graph replay and a mixed step of 5 prompts x 430 tokens, base vs LoRA, no overlap
      # (a step's device time is its own), median of 5 mixed steps. S2's LoRA half loads
      # 246 adapters (~15 GB) before it times anything: over 320 s in session 12.
      if [[ $part == mixed_s1 ]]; then pts=(--batches 237 --ranks 8); t=240
      else pts=(--batches 246 --ranks 64,32,16,8); t=540; fi
      timeout $t python benchmarks/profile_step.py --model llama-7b "${pts[@]}" --context 430 \
        --steps 20 --mixed-prompts 5 --mixed-reps 5 --mixed-decode-graphs 64 --no-overlap \
        --out-dir "$OUT/prof" 2>&1 | grep '^{'
      tar czf "$OUT/${part}.tgz" -C "$OUT" prof && rm -r "$OUT/prof" ;;
    mixed_s1_width)  # mixed_s1's LoRA half on tables for rank 8 and for 64 (the server's
      # default width): what prompt rows' LoRA tiles at r_pad 64 cost rank-8 adapters
      # (..._eager: the mixed step's decode rows eager, the engine's default)
      for w in 8 64 8_eager 64_eager; do
        g=(--mixed-decode-graphs 64); if [[ $w == *_eager ]]; then g=(); fi
        timeout 200 python benchmarks/profile_step.py --model llama-7b --batches 237 --ranks 8 \
          --max-lora-rank ${w%_eager} --context 430 --steps 20 --mixed-prompts 5 --mixed-reps 5 \
          ${g[@]+"${g[@]}"} --no-overlap --scenarios lora --out-dir "$OUT/prof$w" \
          2>&1 | grep '^{' | cut -c1-1200
        mv "$OUT/prof$w/profile_mixed_lora_b237.txt" "$OUT/mixed_w$w.txt"; rm -rf "$OUT/prof$w"
      done ;;
    s1n10000)  # ANCHORS: 10,000 adapters registered, >= 2,000 distinct served in one run
      # (S1 saturates near 31 req/s: 35 req/s for 90 s, cut at 100 s, ~2,600 distinct)
      bench 300 --setting S1 -n 10000 --rate 35 --duration 90 --time-limit 100 \
        --out "$OUT/bench_S1_n10000_r35.json" ;;
    profile_io)  # mixed steps with the adapter I/O threads idle vs packing (contention?)
      timeout 240 python benchmarks/profile_step.py --model llama-7b --batches 240 --context 256 \
        --steps 10 --mixed-prompts 4 --scenarios lora --io-load --io-steps 5 \
        --out-dir "$OUT/prof" 2>&1 | grep '^{'
      tar czf "$OUT/profile_io.tgz" -C "$OUT" prof && rm -r "$OUT/prof" ;;
    lora_sweep)
      timeout "${SWEEP_TIMEOUT:-400}" python benchmarks/bench_lora.py --sweep ${SWEEP_PHASES:+--phases "$SWEEP_PHASES"} \
        ${SWEEP_LAYERS:+--layers "$SWEEP_LAYERS"} \
        --out "$OUT/bench_lora_sweep.json" \
        2>&1 | grep -v Warning | grep -E "^rank_cl" ;
      python benchmarks/sweep_best.py "$OUT/bench_lora_sweep.json" ;;
    lora_tlb)
      for gb in 0 100; do
        pool=(); if [ "$gb" != 0 ]; then pool=(--pool-gb "$gb"); fi
        timeout 150 python benchmarks/bench_lora.py --batches 64 256 --ranks 16 64 "${pool[@]}" \
          --out "$OUT/bench_lora_pool${gb}.json" 2>&1 | grep -E '^(phase|decode|grouped)' | tail -14
      done
      for util in 0.2 0.8; do
        timeout 120 python benchmarks/profile_step.py --batches 128 --steps 10 --scenarios lora \
          --gpu-memory-utilization "$util" --out-dir "$OUT/prof_util$util" 2>&1 | grep '^{'
        rm -rf "$OUT/prof_util$util"
      done ;;
    overlap_ab)
      for b in 64 256; do
        timeout 200 python benchmarks/engine_throughput.py --batch "$b" --new-tokens 128 \
          --backends triton+graphs,triton+graphs+nooverlap --gpu-memory-utilization 0.8 \
          --out "$OUT/overlap_b$b.json" 2>&1 | grep -v Warning | tail -4
      done ;;
    peft_s2n100)  # PEFT long enough to finish requests (30 s runs finish none): S2 n=100
      bench 420 --setting S2 -n 100 --rate 10 --duration 20 --baselines peft --time-limit 30 \
        --peft-time-limit 300 --out "$OUT/bench_S2_n100_peft300.json" ;;
    table_*)  # table_S_N[_ablation]: S-LoRA's table at R=10 on one 20 s trace, N a comma list
      IFS=_ read -r _ s ns extra <<< "$part"
      baselines=base,peft
      variant=()
      case ${extra:-} in
        ablation) baselines=base,peft,padded,separate ;;
        base) baselines=base ;;  # no PEFT: it completes nothing in a 30 s run
        group) baselines=base; variant=(--variant 'rows=--no-group-lora-rows') ;;
      esac
      bench "${TABLE_TIMEOUT:-560}" --setting "$s" -n "$ns" --rate 10 --duration 20 \
        --baselines "$baselines" ${variant[@]+"${variant[@]}"} --peft-max-n 100 \
        --time-limit 30 --peft-time-limit 30 \
        --padded-time-limit 30 --out "$OUT/bench_${s}_n${ns//,/-}${extra:+_$extra}.json" ;;
    *) echo "unknown part $part" ;;
  esac
done
