"""The Triton kernels of the shared model code (norm, rope, FP8 dense GEMM), run by Triton's
interpreter on the CPU inside whole forward passes, against the same models' plain-torch path
(tests/triton_interpreted_forward.py). Skipped where Triton is not installed (the CPU wheel
of torch ships without it) or numpy is 2.x (the interpreter's loop bounds need numpy < 2)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_interpreted_kernels_match_the_torch_path():
    pytest.importorskip("triton")
    np = pytest.importorskip("numpy")
    if int(np.__version__.split(".")[0]) >= 2:
        pytest.skip("Triton's interpreter needs numpy < 2")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interpreted_forward.py"), "--torch-quant"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    diffs = [float(m) for m in re.findall(r"rel\. diff ([0-9.e+-]+)", r.stdout)]
    assert len(diffs) == 4, r.stdout  # two models x (fp8, same) projections
    assert max(diffs) < 1e-5, r.stdout  # the same arithmetic up to fp32 rounding
