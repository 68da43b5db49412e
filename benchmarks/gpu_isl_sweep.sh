#!/usr/bin/env bash
# 2+ GPUs: issue 16's ISL sweep. qwen3-235b-a22b shape (LAYERS layers), dp / dep / dwdp on every
# GPU of the machine, ISL 1K..32K (normal, CV 0.2) at each MNT: one bench invocation per MNT
# holding every ISL, three times over in the same processes (--repeat REPS), inside BUDGET seconds
# (what would not fit is skipped and logged). Then the min / median / max table over repetitions
# and isl_sweep.png with the planner's prediction beside each curve (PROFILE: a built-in name or a
# `dwdp calibrate` JSON of the same machine).
# Usage: [MNTS="16384 32768"] [ISLS=1024,2048,4096,8192,16384,32768] [REPS=3] [LAYERS=8] [REQS=4]
#        [PROFILE=h200] [BUDGET=540] [PER=300] bash benchmarks/gpu_isl_sweep.sh OUT COMMIT
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}
MNTS=${MNTS:-16384}; ISLS=${ISLS:-1024,2048,4096,8192,16384,32768}; REPS=${REPS:-3}; LAYERS=${LAYERS:-8}
REQS=${REQS:-4}; PROFILE=${PROFILE:-h200}; PER=${PER:-300}
. "$(dirname "$0")/gpu_env.sh"
for mnt in $MNTS; do
  # REQS requests per rank at the longest ISL; the bench gives shorter ISLs proportionally more.
  run_in_budget "isl_sweep_mnt$mnt" "$PER" python3 -m dwdp.cli bench --device cuda -W "$G" --model qwen3-235b-a22b \
    --num-layers "$LAYERS" --dist normal --cv 0.2 --isl "$ISLS" --num-requests $((REQS * G)) --max-num-tokens "$mnt" \
    --strategies dp,dep,dwdp --balance-tail --repeat "$REPS" --timeout "$PER" --out "$OUT/isl_sweep_mnt$mnt.json"
done
cat "$OUT/log"
ls "$OUT"/isl_sweep_*.json > /dev/null 2>&1 || exit 1
python3 -m dwdp.cli report --reps "$OUT"/isl_sweep_*.json | tee "$OUT/isl_reps.md"
python3 -m dwdp.cli report "$OUT"/isl_sweep_*.json -o "$OUT/plots" --hardware "$PROFILE"
