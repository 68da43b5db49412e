#!/bin/bash
# One short device call: the FP8 dense / glue GPU tests, the dense GEMM rates, and the
# one-GPU step anatomy of qwen3-235b-a22b (8 layers) and deepseek-v3 (5 layers) with this
# tree and with the base commit d35b9a9 (a `git archive` of its src/ under base/src).
# Run from the tree's root; writes under $OUT.
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 40 python -m pytest -q -p no:cacheprovider tests/test_gpu_fp8_dense.py 2>&1 | tail -8
timeout 25 python benchmarks/fp8_dense.py --tokens 16384 --iters 5 --out $OUT/fp8_dense.json 2>&1 | tail -12
L=8192,6000,2192
for m in "qwen3-235b-a22b 8" "deepseek-v3 5"; do
  set -- $m
  timeout 40 python benchmarks/step_anatomy.py --one-gpu --model $1 --layers $2 --lengths $L --formats fp8/fp8,fp8/same \
    --iters 2 --label new --out $OUT/anatomy_$1_new.json 2>&1 | grep -v Warning | tail -3
  PYTHONPATH=base/src timeout 30 python benchmarks/step_anatomy.py --one-gpu --model $1 --layers $2 --lengths $L \
    --formats fp8/same --iters 2 --label base-d35b9a9 --out $OUT/anatomy_$1_base.json 2>&1 | grep -v Warning | tail -3
done
