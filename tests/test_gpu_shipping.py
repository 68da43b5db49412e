"""Token shipping on GPUs: the device-side counters, and shipped steps against pulled ones.

GPU only: skipped without CUDA and Triton (the 2-GPU test also without 2 GPUs). Run on
the GPU machine with ``PYTHONPATH=src python -m pytest tests/test_gpu_shipping.py``.
"""

import pytest
import torch

from dwdp import kernels

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAVE_TRITON),
                                reason="needs CUDA and Triton")


def test_counter_wait_passes_when_reached_and_times_out_when_not():
    from dwdp.kernels.signals import signal_set, signal_wait

    flag = torch.zeros(1, dtype=torch.int64, device="cuda")
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    signal_set(flag, 7, status)
    signal_wait(flag, 7, status, 1.0, 3)
    torch.cuda.synchronize()
    assert int(flag) == 7 and int(status) == 0
    signal_wait(flag, 8, status, 0.05, 3)  # never reached: gives up, records code 3
    torch.cuda.synchronize()
    assert int(status) == 3
    signal_set(flag, 9, status)  # a set behind a timed-out wait does not vouch for bad data
    torch.cuda.synchronize()
    assert int(flag) == 7


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_shipped_steps_equal_pulled_steps_on_two_gpus(model):
    from dwdp.parallel.launch import spawn_local
    from dwdp_workers import gpu_ship_worker

    res = spawn_local(gpu_ship_worker, 2, (2, model, [1, 37, 200, 300], 256), timeout_s=300)
    for r, out in enumerate(res):
        assert max(out["rel_err"]) < 2e-2, (r, out["rel_err"])  # bf16: two summation orders
        assert out["shipped"] == [True, True, True, False], out["shipped"]  # 300 > the 256-token boxes
    msg, seconds = res[0]["timeout"]
    assert "TransportTimeout" in msg and "rank 1" in msg, msg
    assert 2.0 < seconds < 8  # one timeout (3 s), not one per layer
