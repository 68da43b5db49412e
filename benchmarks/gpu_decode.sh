#!/usr/bin/env bash
# One GPU: the decode tests, then decode step time vs the memory-bound limit and built
# memory vs `dwdp info` (benchmarks/decode_gpu.py). Usage: bash benchmarks/gpu_decode.sh OUT COMMIT
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}
export PYTHONPATH=src PYTHONUNBUFFERED=1 DWDP_COMMIT=$COMMIT
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt" 2>&1
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py tests/test_gpu_kernels.py \
  > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/log"
timeout 330 python3 benchmarks/decode_gpu.py --case qwen3-235b-a22b:8:same --case qwen3-235b-a22b:8:fp8 \
  --case deepseek-v3:5:fp8 --context 8192 --out "$OUT/decode.json" > "$OUT/decode.txt" 2>&1
echo "decode rc=$?" >> "$OUT/log"
cat "$OUT/log"; tail -5 "$OUT/tests.txt"; cat "$OUT/decode.txt" | tail -30
