#!/usr/bin/env bash
# One GPU: every GPU test at this commit, then the FP8 grouped GEMM's tile configurations
# at short-step sizes (equal and multinomial rows per expert).
# Usage: bash benchmarks/gpu_one_gpu_checks.sh OUT COMMIT [ROWS]
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}; ROWS=${3:-64,128,256,512}
BUDGET=${BUDGET:-540}
source benchmarks/gpu_env.sh
run_in_budget tests 240 python3 -m pytest -q -x tests/test_gpu_attention.py tests/test_gpu_kernels.py \
  tests/test_gpu_decode.py tests/test_gpu_kv_handoff.py tests/test_dep_gpu.py
run_in_budget tune_equal 150 python3 benchmarks/tune_fp8.py --rows $ROWS --out "$OUT/tune_fp8_equal_$COMMIT.json"
run_in_budget tune_multinomial 150 python3 benchmarks/tune_fp8.py --rows $ROWS --multinomial \
  --out "$OUT/tune_fp8_multinomial_$COMMIT.json"
cat "$OUT/log"; tail -3 "$OUT/tests.txt"; cat "$OUT/tune_equal.txt" "$OUT/tune_multinomial.txt" | grep -v "^  ("
