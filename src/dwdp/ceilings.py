"""Hardware ceilings measured on the machine that runs a benchmark (GPU only).

Every speed we report is set against one of these, measured in the same run: a large
bf16 matmul (FLOP/s), a device-to-device copy (bytes read + written per second), and
peer pulls over NVLink (see :mod:`dwdp.parallel` benchmarks).
"""

from __future__ import annotations

import platform
import subprocess

import torch

from .timing import time_cuda  # noqa: F401  (callers import it from here too)


def matmul_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = time_cuda(lambda: a @ b)
    return 2 * n**3 / t / 1e12


def copy_gbps(nbytes: int = 2 << 30) -> float:
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src))
    return 2 * nbytes / t / 1e9  # read + write


def machine_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    import os

    if os.environ.get("DWDP_COMMIT"):
        info["commit"] = os.environ["DWDP_COMMIT"]
        return info
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=5).stdout.strip() or None
    except Exception:
        info["commit"] = None
    return info


def a2a_numel(nbytes_per_rank: int, ranks: int) -> int:
    """bf16 elements of an equal-split all-to-all buffer of at most ``nbytes_per_rank``
    (at least one 4 KiB chunk per peer), each peer's chunk a whole number of 4 KiB: at an
    arbitrary size (one step's dispatch bytes) the chunks start at 2-byte offsets, the
    suspected cause of the bench's ceiling reading half of NCCL's rate (158-169 GB/s where
    whole-MiB sizes read 289-324 on 4x H200)."""
    return max(2048, (nbytes_per_rank // 2 // ranks) // 2048 * 2048) * ranks


def all_to_all_gbps(process_group=None, nbytes_per_rank: int = 256 << 20, iters: int = 10) -> float:
    """Per-rank all-to-all bandwidth: bytes each rank sends to *other* ranks per second,
    with equal splits (NCCL's best case; what DEP's dispatch and combine can approach)."""
    import torch.distributed as dist

    n = dist.get_world_size(process_group)
    numel = a2a_numel(nbytes_per_rank, n)
    src = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dist.all_to_all_single(dst, src, group=process_group), warmup=3, iters=iters)
    return numel * 2 * (n - 1) / n / t / 1e9
