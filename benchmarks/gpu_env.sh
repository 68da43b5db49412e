# Sourced by the multi-GPU scripts after they set OUT and COMMIT: the environment every
# run on the GPU machine needs (NVLink multicast off, the commit recorded in each JSON),
# the output folder, the cards in $OUT/gpus.txt, and G = the number of visible GPUs.
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DWDP_COMMIT=$COMMIT
mkdir -p "$OUT"
G=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1

# run_in_budget NAME PER CMD...: CMD (output in $OUT/NAME.txt) under `timeout` (its whole process
# group: the ranks too), limited to PER seconds and to what is left of BUDGET seconds since this
# file was sourced; skipped and logged when less than MIN_LEFT seconds are left. So a script's
# runs, in priority order, end inside one device call.
BUDGET=${BUDGET:-540}; MIN_LEFT=${MIN_LEFT:-60}; _budget_start=$SECONDS
run_in_budget() {
  local name=$1 per=$2; shift 2
  local left=$((BUDGET - (SECONDS - _budget_start)))
  if [ "$left" -lt "$MIN_LEFT" ]; then echo "$name skipped: $left s of the budget left" >> "$OUT/log"; return 0; fi
  local t=$((left < per ? left : per)) t0=$SECONDS
  timeout -k 10 "$t" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$? $((SECONDS - t0)) s (limit $t s)" >> "$OUT/log"
}
