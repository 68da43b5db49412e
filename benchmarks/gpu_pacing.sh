#!/usr/bin/env bash
# 2+ GPUs (issue 16): the copy-engine GPU tests, then three repetitions of dp / dep / dwdp
# with --balance-tail, then timed arrivals with and without the short-step hold. Usage: bash benchmarks/gpu_pacing.sh OUT COMMIT
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}
. "$(dirname "$0")/gpu_env.sh"
COMMON="--device cuda -W $G --model qwen3-235b-a22b --num-layers 8 --dist normal --isl 8192 --cv 0.2"
[ -n "${SKIP_TESTS:-}" ] || timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
  -k "copy_engine" > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/log"
for rep in ${REPS:-1 2 3}; do
  timeout 170 python3 -m dwdp.cli bench $COMMON --max-num-tokens ${MNT:-16384} --num-requests $((6 * G)) \
    --strategies ${STRATS:-dp,dep,dwdp} --balance-tail --out "$OUT/bt_rep$rep.json" > "$OUT/bt_rep$rep.txt" 2>&1
  echo "balance-tail rep$rep rc=$?" >> "$OUT/log"
done
if [ -n "${HOLD:-}" ]; then  # Poisson arrivals of 2K prompts: steps are short unless held back
  for hold in 0 3 20; do
    timeout 120 python3 -m dwdp.cli bench --device cuda -W $G --model qwen3-235b-a22b --num-layers 8 --dist uniform \
      --isl 2048 --ratio 0.5 --rate ${HOLD} --num-requests $((24 * G)) --max-num-tokens 16384 --strategies dwdp \
      --hold-ms $hold --out "$OUT/hold${hold}.json" > "$OUT/hold${hold}.txt" 2>&1
    echo "hold $hold rc=$?" >> "$OUT/log"
  done
fi
cat "$OUT/log"; tail -3 "$OUT/tests.txt"
for f in "$OUT"/*.txt; do grep -E "^│ (dp|dep|dwdp) " "$f" | sed "s|^|$(basename $f): |"; done
