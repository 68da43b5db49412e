"""DWDP on real GPUs and copy engines: the logits of a DWDP group equal the full model's
(every expert resident, same seeded weights) with the prefetch waits in place, even with
copies and slot reads delayed on the device; dropping either wait under those delays gives
wrong logits (so the comparison can fail); and the exposed-wait metric accounts for the
time a step loses to pulls it cannot hide (against the same step with pulls switched off).

GPU only: skipped without 2 CUDA devices and Triton. On the GPU machine:
``PYTHONPATH=src python -m pytest tests/test_gpu_dwdp.py``.
"""

import pytest
import torch

from dwdp import kernels

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAVE_TRITON
                                     and torch.cuda.device_count() >= 2), reason="needs 2 CUDA GPUs and Triton")


def test_dwdp_group_matches_full_model_and_dropped_waits_show():
    from gpu_dwdp_workers import ordering_worker
    from dwdp.parallel.launch import spawn_local

    ranks = spawn_local(ordering_worker, 2, (2, "qwen3-30b-a3b", 4), timeout_s=400)
    for r, res in enumerate(ranks):
        for name in ("waits", "waits_delayed"):
            # Same kernels and weights; only the expert segments' split differs from the full model.
            assert max(res[name]) < 2e-3, f"rank {r} {name}: rel err {res[name]}"
        for name in ("no_write_after_read_wait", "no_read_after_write_wait"):
            # Seen on 2x and 4x H200: 0.23-0.25 (a slot read before its copy landed, or overwritten under it).
            assert max(res[name]) > 0.05, f"rank {r} {name}: the race did not show ({res[name]})"


def test_exposed_wait_metric_accounts_for_unhidden_pulls():
    from gpu_dwdp_workers import exposed_wait_worker
    from dwdp.parallel.launch import spawn_local

    # 128 tokens over 4 layers of qwen3-235b-a22b: ~10 ms of compute against GBs of pulls.
    ranks = spawn_local(exposed_wait_worker, 2, (2, "qwen3-235b-a22b", 4, 128), timeout_s=400)
    for r, res in enumerate(ranks):
        lost = res["pulls_s"] - res["no_pulls_s"]
        assert lost > 0 and res["no_pulls_exposed_wait_s"] < 0.1 * lost, res
        # Seen on 4x H200: 31.6 ms of metric for 31.1 ms lost (128 tokens).
        assert 0.6 * lost < res["pulls_exposed_wait_s"] < 1.4 * lost + 2e-3, f"rank {r}: {res}"
