#!/usr/bin/env bash
# The strong DEP against dp and DWDP on this machine: the DEP layer benchmark, then the
# headline bench setting three times. Usage: bash benchmarks/gpu_strong_dep.sh OUT COMMIT [LAYERS]
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}; LAYERS=${3:-8}
. "$(dirname "$0")/gpu_env.sh"
timeout 120 python3 benchmarks/dep_gpu.py -N $G --transports nccl --overlap 0 --iters 5 --out "$OUT/dep_layer.json" \
  > "$OUT/dep_layer.txt" 2>&1
echo "dep layer rc=$?" >> "$OUT/log"
for rep in 1 2 3; do
  timeout 150 python3 -m dwdp.cli bench --device cuda -W $G --model qwen3-235b-a22b --num-layers $LAYERS --dist normal \
    --isl 8192 --cv 0,0.2 --max-num-tokens 32768 --num-requests 32 --strategies dp,dep,dwdp --ceilings \
    --out "$OUT/bench_rep$rep.json" > "$OUT/bench_rep$rep.txt" 2>&1
  echo "bench rep$rep rc=$?" >> "$OUT/log"
done
cat "$OUT/log"
