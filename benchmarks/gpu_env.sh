# Sourced by the multi-GPU scripts after they set OUT and COMMIT: the environment every
# run on the GPU machine needs (NVLink multicast off, the commit recorded in each JSON),
# the output folder, the cards in $OUT/gpus.txt, and G = the number of visible GPUs.
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DWDP_COMMIT=$COMMIT
mkdir -p "$OUT"
G=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
