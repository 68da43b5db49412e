#!/usr/bin/env bash
# 2 GPUs: issue 17's full-depth run, repeated. qwen3-235b-a22b, all 94 layers, FP8 experts,
# DWDP2 vs DEP2, ISL 8K normal CV 0.2, 12 requests, MNT 8K, --balance-tail. Each repetition is
# its own bench invocation (the model is built anew), under `timeout`; the whole loop stays inside
# BUDGET seconds (a repetition that would not fit is skipped and logged), then a summary table.
# Usage: [SKEWS="0 1.0"] [REPS=3] [BUDGET=520] bash benchmarks/gpu_full_depth.sh OUT COMMIT
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}
SKEWS=${SKEWS:-0}; REPS=${REPS:-3}; BUDGET=${BUDGET:-520}; PER=${PER:-160}; MIN_LEFT=${MIN_LEFT:-80}
. "$(dirname "$0")/gpu_env.sh"
start=$SECONDS
for skew in $SKEWS; do
  tag=""; [ "$skew" = 0 ] || tag="_skew$skew"
  for rep in $(seq 1 "$REPS"); do
    name=full_depth_fp8_mnt8k${tag}_rep$rep
    left=$((BUDGET - (SECONDS - start)))
    if [ $left -lt "$MIN_LEFT" ]; then echo "$name skipped: $left s of the budget left" >> "$OUT/log"; continue; fi
    t=$((left < PER ? left : PER)); t0=$SECONDS
    timeout "$t" python3 -m dwdp.cli bench --device cuda -W 2 --model qwen3-235b-a22b --expert-dtype fp8 \
      --dist normal --isl 8192 --cv 0.2 --num-requests 12 --max-num-tokens 8192 --skew "$skew" \
      --strategies dwdp,dep --balance-tail --out "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
    echo "$name rc=$? $((SECONDS - t0)) s (limit $t s)" >> "$OUT/log"
  done
done
cat "$OUT/log"
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
print(f"{'file':42s} {'skew':>4s} {'dwdp':>7s} {'dep':>7s} {'ratio':>6s}  peak GiB dwdp r0/r1  dep r0/r1")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    d = json.load(open(f)); run = d["runs"][0]; res = run["results"]
    tps = {s: (r["tps_per_gpu"] if not r.get("skipped") else float("nan")) for s, r in res.items()}
    pk = {s: "/".join(f"{k['peak_memory_bytes'] / 2**30:.1f}" for k in r.get("ranks", [])) for s, r in res.items()}
    print(f"{os.path.basename(f):42s} {run['spec']['skew']:4.1f} {tps.get('dwdp', 0):7,.0f} {tps.get('dep', 0):7,.0f}"
          f" {tps.get('dwdp', 0) / tps.get('dep', 1):6.3f}  {pk.get('dwdp', '-'):>17s}  {pk.get('dep', '-')}"
          f"   commit {d['machine'].get('commit')} torch {d['machine'].get('torch')}")
EOF
