#!/usr/bin/env bash
# Issue 15's acceptance on every GPU of the machine (4 for the acceptance): the DEP layer
# benchmark (compute vs dp, dispatch + combine vs NCCL's all-to-all), then dp / dep / dwdp on the
# strategy-table settings, each setting three times in the same processes (--repeat 3), in
# priority order inside BUDGET seconds (what would not fit is skipped and logged):
#   qwen3-235b-a22b (LAYERS layers) bf16, ISL 8K normal, CV 0 / 0.2 / 0.3, MNT 16K / 32K;
#   the same with router skew 1.0 and with FP8 experts; deepseek-v3 (DSV3_LAYERS layers) bf16 as the
#   first, FP8 (dsv3fp8), router skew 1.0 (dsv3skew). 16 requests per GPU, --balance-tail.
# Item a2a (first by default): NCCL's all-to-all per message size (benchmarks/a2a_sizes.py).
# Then the min / median / max table (reps.md). Usage: [BUDGET=540] [ITEMS="a2a layer qwen skew fp8 dsv3"]
#   bash benchmarks/gpu_strong_dep.sh OUT COMMIT [LAYERS] [DSV3_LAYERS]
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}; LAYERS=${3:-8}; DSV3_LAYERS=${4:-5}
ITEMS=${ITEMS:-a2a layer qwen skew fp8 dsv3}
. "$(dirname "$0")/gpu_env.sh"
bench() {  # NAME PER ARGS...: one bench invocation, every strategy, three repetitions
  local name=$1 per=$2; shift 2
  run_in_budget "$name" "$per" python3 -m dwdp.cli bench --device cuda -W "$G" --dist normal --isl 8192 \
    --num-requests $((16 * G)) --strategies dp,dep,dwdp --balance-tail --ceilings --repeat 3 --timeout "$per" \
    --out "$OUT/$name.json" "$@"
}
for item in $ITEMS; do
  case $item in
    layer) run_in_budget dep_layer 180 python3 benchmarks/dep_gpu.py -N "$G" --iters 5 \
             --out "$OUT/dep_layer.json" ;;
    a2a)  # NCCL's all-to-all against message size in fresh processes: the curve DEP's rate is read against
      run_in_budget a2a_sizes 90 python3 benchmarks/a2a_sizes.py -N "$G" --out "$OUT/a2a_sizes.json" ;;
    qwen) bench qwen_bf16 240 --model qwen3-235b-a22b --num-layers "$LAYERS" --cv 0,0.2,0.3 --max-num-tokens 16384,32768 ;;
    skew) bench qwen_bf16_skew1 240 --model qwen3-235b-a22b --num-layers "$LAYERS" --cv 0,0.2,0.3 \
            --max-num-tokens 16384,32768 --skew 1.0 ;;
    fp8) bench qwen_fp8 240 --model qwen3-235b-a22b --num-layers "$LAYERS" --cv 0,0.2,0.3 --max-num-tokens 16384,32768 \
           --expert-dtype fp8 ;;
    dsv3) bench dsv3_bf16 260 --model deepseek-v3 --num-layers "$DSV3_LAYERS" --cv 0,0.2,0.3 --max-num-tokens 16384,32768 ;;
    dsv3fp8) bench dsv3_fp8 260 --model deepseek-v3 --num-layers "$DSV3_LAYERS" --cv 0,0.2 --max-num-tokens 16384,32768 \
               --expert-dtype fp8 ;;
    dsv3skew) bench dsv3_bf16_skew1 260 --model deepseek-v3 --num-layers "$DSV3_LAYERS" --cv 0,0.2,0.3 \
                --max-num-tokens 16384,32768 --skew 1.0 ;;
    *) echo "unknown item $item" >> "$OUT/log" ;;
  esac
done
cat "$OUT/log"
ls "$OUT"/*.json > /dev/null 2>&1 && python3 -m dwdp.cli report --reps $(ls "$OUT"/*.json | grep -v dep_layer) | tee "$OUT/reps.md"
grep -h "wall" "$OUT"/*.txt
