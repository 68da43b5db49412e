#!/usr/bin/env bash
# 2+ GPUs: the GPU tests, then dp / dep / dwdp on a workload with a short last step per
# rank, without and with --balance-tail (issue 16). Usage: bash benchmarks/gpu_balance_tail.sh OUT COMMIT
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}
. "$(dirname "$0")/gpu_env.sh"
[ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py tests/test_gpu_kernels.py tests/test_dep_gpu.py \
  > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/log"
for bal in ${BAL_MODES:-plain balanced}; do
  flag=""; [ $bal = balanced ] && flag="--balance-tail"
  timeout 170 python3 -m dwdp.cli bench --device cuda -W $G --model qwen3-235b-a22b --num-layers 8 --dist normal \
    --isl 8192 --cv 0.2 --max-num-tokens 16384 --num-requests $((6 * G)) --strategies dp,dep,dwdp $flag \
    --out "$OUT/bench_$bal.json" > "$OUT/bench_$bal.txt" 2>&1
  echo "bench $bal rc=$?" >> "$OUT/log"
done
cat "$OUT/log"; tail -3 "$OUT/tests.txt"; for f in "$OUT"/bench_*.txt; do tail -8 "$f"; done
