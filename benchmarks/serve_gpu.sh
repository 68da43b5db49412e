#!/usr/bin/env bash
# End-to-end serving on one machine: a DWDP prefill group vs a DEP prefill group (same GPU
# count), decode on the last GPU, replaying one workload at several request rates.
# Usage: benchmarks/serve_gpu.sh OUT_DIR   (env: MODEL LAYERS RANKS DECODE ISL CV OSL N RATES DEVICE)
set -uo pipefail
OUT=${1:?output dir}; mkdir -p "$OUT"
MODEL=${MODEL:-qwen3-235b-a22b}; LAYERS=${LAYERS:-4}; RANKS=${RANKS:-3}; DECODE=${DECODE:-cuda:3}
ISL=${ISL:-8192}; CV=${CV:-0.2}; OSL=${OSL:-128}; N=${N:-24}; RATES=${RATES:-"1 4"}; GPUS=${GPUS:-4}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for P in dwdp dep; do
  PORT=$((8100 + RANDOM % 800))
  python3 -m dwdp.cli serve --model "$MODEL" --num-layers "$LAYERS" --device "$DECODE" --prefill "$P" \
      --prefill-ranks "$RANKS" --max-num-tokens 16384 --max-batch 32 --port "$PORT" > "$OUT/serve_$P.log" 2>&1 &
  SRV=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
  for R in $RATES; do
    python3 -m dwdp.cli loadtest --url "http://127.0.0.1:$PORT" --num-requests "$N" --isl "$ISL" --dist normal \
        --cv "$CV" --max-tokens "$OSL" --rate "$R" --gpus "$GPUS" --out "$OUT/serve_${P}_rate$R.json"
  done
  kill -TERM $SRV; wait $SRV
done
