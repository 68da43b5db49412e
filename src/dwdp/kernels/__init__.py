"""Triton kernels for the GPU path (FP8 grouped GEMM, fused MoE epilogues).

Every kernel has a plain PyTorch equivalent used on CPU and wherever Triton is missing;
``enabled(t)`` says whether the Triton version applies to tensor ``t``.
DWDP_NO_TRITON=1 forces the PyTorch path; benchmarks compare the two in one process
with :func:`triton_off`.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # the CPU wheel of torch ships without Triton
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

# Read once: enabled() is asked at every kernel dispatch of every layer.
_use_triton = HAVE_TRITON and not os.environ.get("DWDP_NO_TRITON")


def enabled(t: torch.Tensor) -> bool:
    return _use_triton and t.is_cuda


@contextlib.contextmanager
def triton_off():
    """The PyTorch path for everything run inside (not thread-safe: benchmarks only)."""
    global _use_triton
    before, _use_triton = _use_triton, False
    try:
        yield
    finally:
        _use_triton = before
