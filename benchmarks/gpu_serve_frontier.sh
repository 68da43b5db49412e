#!/usr/bin/env bash
# One GPU: `dwdp serve` (local prefill + the decode engine) on a real model shape with
# random weights, and a concurrency sweep with `dwdp loadtest` -> a frontier file.
# Usage: bash benchmarks/gpu_serve_frontier.sh OUT COMMIT [LAYERS] [ISL] [OSL] [REPS]
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}; LAYERS=${3:-8}; ISL=${4:-4096}; OSL=${5:-256}; REPS=${6:-3}
# Serving deps (fastapi, uvicorn, prometheus_client) where the machine lacks them: .gpudeps (carried)
export PYTHONPATH=src:.gpudeps PYTHONUNBUFFERED=1 DWDP_COMMIT=$COMMIT
PORT=8011
python3 -m dwdp.cli serve --model qwen3-235b-a22b --num-layers $LAYERS --expert-dtype fp8 --device cuda \
  --max-batch 64 --max-context $((ISL + OSL + 64)) --max-num-tokens 16384 --port $PORT > "$OUT/serve.txt" 2>&1 &
SRV=$!
python3 - <<PY
import json, time, urllib.request
for _ in range(240):
    if __import__("os").system("kill -0 $SRV 2>/dev/null"): break  # the server died
    try:
        if json.load(urllib.request.urlopen("http://127.0.0.1:$PORT/health", timeout=2)).get("status") == "ok":
            break
    except Exception:
        time.sleep(1)
PY
for rep in $(seq 1 $REPS); do
  timeout 420 python3 -m dwdp.cli loadtest --url http://127.0.0.1:$PORT --isl $ISL --dist fixed --max-tokens $OSL \
    --num-requests 64 --sweep-concurrency 2,8,32,64 --label "dp, 1 GPU, local prefill" --seed $rep \
    --out "$OUT/frontier_rep$rep.json" > "$OUT/loadtest_rep$rep.txt" 2>&1
  echo "loadtest rep$rep rc=$?" >> "$OUT/log"
done
kill -TERM $SRV; wait $SRV
cat "$OUT/log"; tail -q -n 8 "$OUT"/loadtest_rep*.txt; tail -5 "$OUT/serve.txt"
