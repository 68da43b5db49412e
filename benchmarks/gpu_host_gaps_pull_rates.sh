#!/usr/bin/env bash
# 2+ GPUs (issues 16, 19), in priority order inside one device call:
#  1. step_anatomy.py bf16 and FP8: the compute stream's idle time of a DWDP step against dp's,
#     now that the split MoE reads its segment boundaries back behind the permute;
#  2. `dwdp calibrate` with the pulls-beside-compute probe (profile.json);
#  3. three repetitions of dp / dep / dwdp with equal last steps (the earlier 2x H200 table);
#  4. NCCL's all-to-all per message size with 4 KiB-rounded chunks (a2a_sizes.py).
# Usage: bash benchmarks/gpu_host_gaps_pull_rates.sh OUT COMMIT
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}
. "$(dirname "$0")/gpu_env.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py -k "split_segments or fp8" \
  > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/log"
for dt in bf16 fp8; do
  run_in_budget "anatomy_$dt" 120 python3 benchmarks/step_anatomy.py -N "$G" --model qwen3-235b-a22b --layers 8 \
    --lengths 8192,4181 --expert-dtype "$dt" --out "$OUT/anatomy_$dt.json"
done
run_in_budget calibrate 150 python3 -m dwdp.cli calibrate --model qwen3-235b-a22b --num-layers 8 --out "$OUT/profile.json"
COMMON="--device cuda -W $G --model qwen3-235b-a22b --num-layers 8 --dist normal --isl 8192 --cv 0.2"
for rep in ${REPS:-1 2 3}; do
  run_in_budget "bt_rep$rep" 120 python3 -m dwdp.cli bench $COMMON --max-num-tokens 16384 --num-requests $((6 * G)) \
    --strategies dp,dep,dwdp --balance-tail --out "$OUT/bt_rep$rep.json"
done
run_in_budget a2a_sizes 60 python3 benchmarks/a2a_sizes.py -N "$G" --out "$OUT/a2a_sizes.json"
cat "$OUT/log"; tail -3 "$OUT/tests.txt"
grep -h "step " "$OUT"/anatomy_*.txt
grep -h -E "pulls|beside|matmul|interference|under" "$OUT/calibrate.txt"
for f in "$OUT"/bt_rep*.txt; do grep -E "^│ (dp|dep|dwdp) " "$f" | sed "s|^|$(basename $f): |"; done
tail -12 "$OUT/a2a_sizes.txt"
