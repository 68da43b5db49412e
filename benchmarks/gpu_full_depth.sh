#!/usr/bin/env bash
# Issue 17's full-depth run on every GPU of the machine: qwen3-235b-a22b, all 94 layers (or MODEL
# at LAYERS layers: deepseek-v3 at 32 layers is the most that fits DWDP4 with FP8 experts at MNT 32K
# on 141 GB cards, `dwdp info` + the fit check), FP8 experts, DWDP vs DEP, ISL 8K normal CV 0.2, 6 requests per GPU, --balance-tail, each skew in
# SKEWS one bench invocation running its setting three times (--repeat 3, the model built once),
# inside BUDGET seconds (what would not fit is skipped and logged), then a summary table.
# TAG=x EXTRA="-L auto" adds bench flags (e.g. DWDP keeping as many experts as fit) and names the files.
# Usage: [SKEWS="0 1.0"] [MNT=8192] [MODEL=qwen3-235b-a22b LAYERS=] [TAG= EXTRA=] [BUDGET=540]
#        bash benchmarks/gpu_full_depth.sh OUT COMMIT
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}
SKEWS=${SKEWS:-0}; MNT=${MNT:-8192}; PER=${PER:-240}; MODEL=${MODEL:-qwen3-235b-a22b}; LAYERS=${LAYERS:-}
. "$(dirname "$0")/gpu_env.sh"
for skew in $SKEWS; do
  tag=""; [ "$skew" = 0 ] || tag="_skew$skew"
  name=full_depth_fp8_mnt$((MNT / 1024))k${tag}_W$G
  [ "$MODEL" = qwen3-235b-a22b ] || name=${MODEL}_L${LAYERS}_fp8_mnt$((MNT / 1024))k${tag}_W$G
  [ -z "${TAG:-}" ] || name=${name}_$TAG
  run_in_budget "$name" "$PER" python3 -m dwdp.cli bench --device cuda -W "$G" --model "$MODEL" ${LAYERS:+--num-layers $LAYERS} --expert-dtype fp8 \
    --dist normal --isl 8192 --cv 0.2 --num-requests $((6 * G)) --max-num-tokens "$MNT" --skew "$skew" --repeat 3 \
    --timeout "$PER" --strategies dwdp,dep --balance-tail ${EXTRA:-} --out "$OUT/$name.json"
done
cat "$OUT/log"
ls "$OUT"/*_W"$G"*.json > /dev/null 2>&1 || exit 1
python3 -m dwdp.cli report --reps "$OUT"/*_W"$G"*.json | tee "$OUT/full_depth_reps.md"
python3 - "$OUT" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*_W*.json"))):
    for run in json.load(open(f))["runs"]:
        pk = {s: max(k["peak_memory_bytes"] for k in r.get("ranks", [])) / 2**30 for s, r in run["results"].items()
              if not r.get("skipped")}
        print(os.path.basename(f), "rep", run["spec"].get("repeat", 1), "peak GiB",
              ", ".join(f"{s} {v:.1f}" for s, v in pk.items()))
PY
