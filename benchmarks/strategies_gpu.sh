#!/usr/bin/env bash
# Strategy comparison on one multi-GPU machine (issue 4): dp / dep / dwdp on the same
# seeded workloads. Usage: benchmarks/strategies_gpu.sh OUT_DIR [WORLD] [WHICH]
# WHICH: qwen (qwen3-235b-a22b shape, 8 layers), dsv3 (deepseek-v3 shape, 5 layers), tiny, all.
set -euo pipefail
OUT=${1:?output dir}; W=${2:-4}; WHICH=${3:-all}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Pass DWDP_COMMIT=<hash> from the machine that has the git history (the GPU copy may not).
DWDP="python3 -m dwdp.cli"
if [[ $WHICH == tiny || $WHICH == all ]]; then
  $DWDP bench --device cuda -W "$W" --num-requests 16 --isl 512 --max-num-tokens 1024 --out "$OUT/tiny_gpu.json"
fi
if [[ $WHICH == qwen || $WHICH == all ]]; then
  $DWDP bench --device cuda -W "$W" --model qwen3-235b-a22b --num-layers 8 --num-requests $((8 * W)) \
    --isl 8192 --dist normal --cv 0,0.1,0.2,0.3 --max-num-tokens 16384,32768 --ceilings --timeout 580 \
    --out "$OUT/qwen3-235b-a22b_L8_W${W}.json"
fi
if [[ $WHICH == dsv3 || $WHICH == all ]]; then
  $DWDP bench --device cuda -W "$W" --model deepseek-v3 --num-layers 5 --num-requests $((8 * W)) \
    --isl 8192 --dist normal --cv 0,0.2 --max-num-tokens 16384,32768 --ceilings --timeout 580 \
    --out "$OUT/deepseek-v3_L5_W${W}.json"
fi
if [[ $WHICH == fp8 ]]; then  # FP8 experts vs bf16 experts, DWDP vs DEP, same workloads (issue 5)
  for M in deepseek-v3:5 qwen3-235b-a22b:8; do
    for ED in same fp8; do
      $DWDP bench --device cuda -W "$W" --model "${M%:*}" --num-layers "${M#*:}" --num-requests $((8 * W)) \
        --isl 8192 --dist normal --cv 0.2 --max-num-tokens 16384 --strategies dwdp,dep --expert-dtype $ED \
        --timeout 280 --out "$OUT/${M%:*}_L${M#*:}_W${W}_${ED}.json"
    done
  done
fi
if [[ $WHICH == groups ]]; then  # issue 8 at the sizes a 4-GPU box allows: DWDP4, two DWDP2 groups, DEP4
  M=qwen3-235b-a22b; L=8
  $DWDP bench --device cuda -W "$W" -N "$W" --model $M --num-layers $L --num-requests $((8 * W)) --isl 8192 \
    --dist normal --cv 0,0.2 --max-num-tokens 32768 --strategies dwdp,dep --timeout 280 --out "$OUT/${M}_L${L}_W${W}_N${W}.json"
  $DWDP bench --device cuda -W "$W" -N $((W / 2)) --model $M --num-layers $L --num-requests $((8 * W)) --isl 8192 \
    --dist normal --cv 0,0.2 --max-num-tokens 32768 --strategies dwdp --timeout 280 --out "$OUT/${M}_L${L}_W${W}_N$((W / 2)).json"
fi
