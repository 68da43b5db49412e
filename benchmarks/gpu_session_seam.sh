#!/usr/bin/env bash
# One device call: GPU tests, a smoke bench of all strategies after the rank-seam refactor,
# and the strong-DEP layer benchmark. Usage: bash benchmarks/gpu_session_seam.sh OUT
set -u
OUT=${1:?out dir}
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DWDP_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.device_count())" >> "$OUT/gpus.txt"
G=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout 180 python3 -m pytest -q -x tests/test_gpu_kernels.py tests/test_dep_gpu.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" | tee -a "$OUT/log"
timeout 200 python3 -m dwdp.cli bench --device cuda -W $G --model qwen3-235b-a22b --num-layers 4 --dist normal \
  --isl 8192 --cv 0.2 --max-num-tokens 16384 --num-requests 16 --strategies dp,dep,dwdp --ceilings \
  --out "$OUT/smoke_bench.json" > "$OUT/smoke_bench.txt" 2>&1
echo "smoke bench rc=$?" | tee -a "$OUT/log"
timeout 150 python3 benchmarks/dep_gpu.py -N $G --iters 3 --out "$OUT/dep_gpu_nccl.json" \
  > "$OUT/dep_gpu_nccl.txt" 2>&1
echo "dep nccl rc=$?" | tee -a "$OUT/log"
tail -3 "$OUT"/*.txt
