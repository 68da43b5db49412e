#!/usr/bin/env bash
# 2+ GPUs: issue 16's ISL sweep. qwen3-235b-a22b shape (LAYERS layers), dp / dep / dwdp on every
# GPU of the machine, ISL 1K..32K (normal, CV 0.2) at each MNT, one bench invocation per
# (MNT, repetition) writing one JSON that holds every ISL; each under `timeout`, the whole loop
# inside BUDGET seconds (what would not fit is skipped and logged). Then the min / median / max
# table over repetitions and isl_sweep.png with the planner's prediction beside each curve
# (PROFILE: a built-in name or a `dwdp calibrate` JSON of the same machine).
# Usage: [MNTS="16384 32768"] [ISLS=1024,2048,4096,8192,16384,32768] [REPS=3] [LAYERS=8] [REQS=4]
#        [PROFILE=h200] [BUDGET=540] [PER=300] bash benchmarks/gpu_isl_sweep.sh OUT COMMIT
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}
MNTS=${MNTS:-16384}; ISLS=${ISLS:-1024,2048,4096,8192,16384,32768}; REPS=${REPS:-3}; LAYERS=${LAYERS:-8}
REQS=${REQS:-4}; PROFILE=${PROFILE:-h200}; BUDGET=${BUDGET:-540}; PER=${PER:-300}; MIN_LEFT=${MIN_LEFT:-60}
. "$(dirname "$0")/gpu_env.sh"
start=$SECONDS
for mnt in $MNTS; do
  for rep in $(seq 1 "$REPS"); do
    name=isl_sweep_mnt${mnt}_rep$rep
    left=$((BUDGET - (SECONDS - start)))
    if [ $left -lt "$MIN_LEFT" ]; then echo "$name skipped: $left s of the budget left" >> "$OUT/log"; continue; fi
    t=$((left < PER ? left : PER)); t0=$SECONDS
    # REQS requests per rank at the longest ISL; the bench gives shorter ISLs proportionally more.
    timeout "$t" python3 -m dwdp.cli bench --device cuda -W "$G" --model qwen3-235b-a22b --num-layers "$LAYERS" \
      --dist normal --cv 0.2 --isl "$ISLS" --num-requests $((REQS * G)) --max-num-tokens "$mnt" \
      --strategies dp,dep,dwdp --balance-tail --out "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
    echo "$name rc=$? $((SECONDS - t0)) s (limit $t s)" >> "$OUT/log"
  done
done
cat "$OUT/log"
ls "$OUT"/isl_sweep_*.json > /dev/null 2>&1 || exit 1
python3 -m dwdp.cli report --reps "$OUT"/isl_sweep_*.json | tee "$OUT/reps.md"
python3 -m dwdp.cli report "$OUT"/isl_sweep_*_rep1.json -o "$OUT/plots" --hardware "$PROFILE"
