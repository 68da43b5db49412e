#!/usr/bin/env bash
# One GPU: `dwdp serve` (local prefill + decode) as in gpu_serve_frontier.sh, then
# benchmarks/serve_anatomy.py (loadtests with the server's step histograms beside them).
# Usage: bash benchmarks/gpu_serve_anatomy.sh OUT COMMIT [LAYERS] [ISL] [OSL]   (SERVE_ARGS: more serve flags)
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}; LAYERS=${3:-8}; ISL=${4:-4096}; OSL=${5:-256}
export PYTHONPATH=src:.gpudeps PYTHONUNBUFFERED=1 DWDP_COMMIT=$COMMIT
PORT=8013
mkdir -p "$OUT"
python3 -m dwdp.cli serve --model qwen3-235b-a22b --num-layers $LAYERS --expert-dtype fp8 --device cuda \
  --max-batch 64 --max-context $((ISL + OSL + 64)) --max-num-tokens 16384 --port $PORT ${SERVE_ARGS:-} > "$OUT/serve.txt" 2>&1 &
SRV=$!
python3 - <<PY
import json, time, urllib.request
for _ in range(240):
    try:
        if json.load(urllib.request.urlopen("http://127.0.0.1:$PORT/health", timeout=2)).get("status") == "ok":
            break
    except Exception:
        pass
    time.sleep(1)
PY
echo "$(date +%T) server ready" >> "$OUT/log"
# A warm-up pass (graph captures, allocator growth), then the measured one.
timeout 200 python3 benchmarks/serve_anatomy.py --url http://127.0.0.1:$PORT --isl $ISL --osl $OSL \
  --concurrency 8,64 --requests 32 --out "$OUT/warmup.json" > "$OUT/warmup.txt" 2>&1
timeout 300 python3 benchmarks/serve_anatomy.py --url http://127.0.0.1:$PORT --isl $ISL --osl $OSL \
  --out "$OUT/anatomy_$COMMIT.json" > "$OUT/anatomy.txt" 2>&1
echo "$(date +%T) anatomy rc=$?" >> "$OUT/log"
kill -TERM $SRV; wait $SRV
echo "$(date +%T) server stopped rc=$?" >> "$OUT/log"
cat "$OUT/log" "$OUT/anatomy.txt"
