"""Triton kernels for the GPU path (FP8 grouped GEMM, fused MoE epilogues).

Every kernel has a plain PyTorch equivalent used on CPU and wherever Triton is missing;
``enabled(t)`` says whether the Triton version applies to tensor ``t``.
DWDP_NO_TRITON=1 forces the PyTorch path (benchmarks compare the two).
"""

from __future__ import annotations

import os

import torch

try:  # the CPU wheel of torch ships without Triton
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False


def enabled(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda and not os.environ.get("DWDP_NO_TRITON")
