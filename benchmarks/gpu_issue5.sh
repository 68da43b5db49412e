#!/usr/bin/env bash
# Issue 5's GPU measurements in one go on a 4-GPU machine: pull plans, pull cost vs the
# communication-free limit (bf16 and FP8 experts), kernel table (MoE parts, FP8, attention,
# step MFU). Usage: benchmarks/gpu_issue5.sh OUT_DIR [N]
set -uo pipefail
OUT=${1:?output dir}; N=${2:-4}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
py=python3
$py benchmarks/pulls.py -N "$N" --out "$OUT/pulls.json"
$py benchmarks/exposed_wait_check.py -N "$N" --model qwen3-235b-a22b --layers 4 --out "$OUT/exposed_wait_qwen.json"
$py benchmarks/exposed_wait_check.py -N "$N" --model qwen3-235b-a22b --layers 4 --expert-dtype fp8 \
  --out "$OUT/exposed_wait_qwen_fp8.json"
$py benchmarks/exposed_wait_check.py -N "$N" --model deepseek-v3 --layers 5 --sizes 181,4096,16384 \
  --out "$OUT/exposed_wait_dsv3.json"
$py benchmarks/exposed_wait_check.py -N "$N" --model deepseek-v3 --layers 5 --sizes 181,4096,16384 \
  --expert-dtype fp8 --out "$OUT/exposed_wait_dsv3_fp8.json"
$py benchmarks/kernels.py --out "$OUT/kernels.json"
