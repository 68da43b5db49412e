"""The CUTLASS FP8 grouped GEMM's build and load logic, without a GPU: it stays out of the
way where CUDA, nvcc or the headers are missing, with a reason, and its configuration
table matches the source it compiles."""

import re

import pytest
import torch

from dwdp.kernels import fp8_cutlass


def test_config_table_matches_the_source():
    src = fp8_cutlass.SOURCE.read_text()
    found = {}
    for cfg, m, n, cm, cn, coop in re.findall(
            r"DWDP_CFG == (\d+)\nusing TileShape = Shape<_(\d+), _(\d+), _128>; using ClusterShape = "
            r"Shape<_(\d+), _(\d+), _1>; constexpr bool kCoop = (true|false);", src):
        found[int(cfg)] = (int(m), int(n), int(cm), int(cn), "coop" if coop == "true" else "pingpong")
    assert found == fp8_cutlass.CONFIGS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_unavailable_without_a_gpu_says_why():
    fp8_cutlass.library.cache_clear()
    assert fp8_cutlass.library() is None
    assert fp8_cutlass.why_unavailable() == "no CUDA device"


def test_build_without_headers_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))  # no cutlass/cutlass.h there
    monkeypatch.setattr(fp8_cutlass, "_nvcc", lambda: "/usr/bin/true")
    with pytest.raises(RuntimeError, match=r"pip install 'dwdp\[cutlass\]'"):
        fp8_cutlass.build()


def test_cli_usage(capsys):
    assert fp8_cutlass.main(["bogus"]) == 2
    assert "python -m dwdp.kernels.fp8_cutlass build" in capsys.readouterr().err
