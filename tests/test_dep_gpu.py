"""DEP on GPUs: the dispatch/receive kernels against plain PyTorch, and a DEP layer over
2 GPUs (bf16 and FP8 experts) against the same layer with every expert on one GPU.

GPU only: skipped without CUDA and Triton (the multi-GPU test also without 2 GPUs).
Run on the GPU machine with
``PYTHONPATH=src python -m pytest tests/test_dep_gpu.py``.
"""

import pytest
import torch

from dwdp import kernels

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAVE_TRITON),
                                reason="needs CUDA and Triton")


def test_scatter_rows_writes_every_slot_and_nothing_else():
    from dwdp.kernels.dep_moe import scatter_rows

    T, J, C = 37, 4, 300
    src = torch.randn(T, C, device="cuda").to(torch.bfloat16)
    hit = torch.rand(T, J, device="cuda") < 0.5
    slot = torch.full((T, J), -1, dtype=torch.long, device="cuda")
    slot[hit] = torch.randperm(int(hit.sum()), device="cuda")
    buf = torch.zeros(int(hit.sum()) + 3, C + 8, dtype=torch.int16, device="cuda")  # wider: a column view
    scatter_rows(src.view(torch.int16), slot, buf[:, 4:4 + C])
    t, j = hit.nonzero(as_tuple=True)
    assert torch.equal(buf[slot[t, j], 4:4 + C], src.view(torch.int16)[t])
    assert not buf[:, :4].any() and not buf[:, 4 + C:].any() and not buf[-3:].any()


def test_gather_rows_from_strided_view():
    from dwdp.kernels.dep_moe import gather_rows

    buf = torch.randint(-1000, 1000, (50, 600), dtype=torch.int32, device="cuda")
    src = buf[:, 7:7 + 513]
    idx = torch.randint(0, 50, (91,), device="cuda")
    out = torch.empty(91, 513, dtype=torch.int32, device="cuda")
    gather_rows(src, idx, out)
    assert torch.equal(out, src[idx])


@pytest.mark.parametrize("weighted", [True, False])
def test_gather_reduce_equals_float64_sum(weighted):
    from dwdp.kernels.dep_moe import gather_reduce

    T, J, H, M = 45, 8, 4096 + 64, 200
    y = torch.randn(M, H, device="cuda").to(torch.bfloat16)
    pos = torch.randint(0, M, (T, J), device="cuda")
    pos[torch.rand(T, J, device="cuda") < 0.4] = -1
    pos[3] = -1  # a row with nothing to add
    w = torch.rand(T, J, device="cuda") if weighted else None
    out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
    gather_reduce(y, pos, w, out)
    ref = torch.zeros(T, H, dtype=torch.float64, device="cuda")
    for t in range(T):
        for j in range(J):
            if pos[t, j] >= 0:
                ref[t] += (w[t, j].double() if weighted else 1.0) * y[pos[t, j]].double()
    assert torch.allclose(out.double(), ref, rtol=1e-2, atol=1e-2)
    assert not out[3].any()


CASES = [
    {"tokens": [200, 0], "routing": "uniform", "seed": 1},
    {"tokens": [64, 130], "routing": "rank0", "seed": 2},  # rank 1 receives nothing
    {"tokens": [1, 1], "routing": "uniform", "seed": 3},
    {"tokens": [300, 257], "routing": "uniform", "seed": 4},
]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("fp8", [False, True])
def test_dep_layer_on_two_gpus_matches_one_gpu(fp8):
    from dep_workers import dep_gpu_worker
    from dwdp.parallel.launch import spawn_local

    ranks = spawn_local(dep_gpu_worker, 2, (fp8, CASES), timeout_s=300)
    for r, res in enumerate(ranks):
        for c, err in enumerate(res["errs"]):
            if CASES[c]["tokens"][r] == 0:
                assert err == 0.0  # an empty output
            else:  # bf16 partial sums per rank (and FP8 activations: quantised once, as dp does)
                assert err < 1e-2, f"case {c} rank {r}: rel err {err:.2e}"
        assert res["host_syncs"] == 1
        assert res["transfer_s"] > 0 and res["wait_s"] > 0
