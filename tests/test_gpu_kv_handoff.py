"""Disaggregated serving with the KV cache handed over GPU to GPU (``kv_transport="cuda_ipc"``):
a prefill rank on cuda:0 shares its KV tensors by CUDA IPC, decode on cuda:1 copies them
peer to peer. Greedy outputs equal those of the host-memory hand-off, token for token.
Needs two CUDA GPUs (skipped otherwise; the CPU suite covers the host hand-off)."""

from __future__ import annotations

import copy

import pytest
import torch

from dwdp.sampling import SamplingParams
from dwdp.serve.disagg import DisaggServingWorker, PrefillPool, PrefillPoolSpec
from dwdp.serve.worker import ServeRequest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA GPUs")

PROMPTS = [[5, 9, 2, 7, 1, 3], list(range(40, 77)), [11, 12], list(range(100, 130))]


def _serve(ref, transport: str) -> list[list[int]]:
    pool = PrefillPool(PrefillPoolSpec(str(ref.path), "dp", 1, device="cuda", max_num_tokens=24,
                                       kv_transport=transport), ready_timeout_s=180)
    decode_model = copy.deepcopy(ref.ours()).to("cuda:1")
    worker = DisaggServingWorker(decode_model, pool, max_batch=3)
    worker.start()
    try:
        reqs = [worker.submit(ServeRequest(p, SamplingParams(max_tokens=6, temperature=0))) for p in PROMPTS]
        out = []
        for r in reqs:
            tokens = []
            while True:
                kind, val = r.events.get(timeout=120)
                if kind == "token":
                    tokens.append(val)
                    continue
                assert kind == "done", val
                break
            out.append(tokens)
        return out
    finally:
        worker.stop(10)


def test_cuda_ipc_handoff_equals_host_handoff(qwen3_ref):
    host = _serve(qwen3_ref, "host")
    ipc = _serve(qwen3_ref, "cuda_ipc")
    assert ipc == host and all(len(t) == 6 for t in ipc)


def test_cuda_ipc_needs_decode_on_a_gpu(qwen3_ref):
    pool = PrefillPool(PrefillPoolSpec(str(qwen3_ref.path), "dp", 1, device="cuda", max_num_tokens=24,
                                       kv_transport="cuda_ipc"), ready_timeout_s=180)
    with pytest.raises(ValueError, match="decode must run on a CUDA device"):
        DisaggServingWorker(qwen3_ref.ours(), pool)  # the CPU model: refused, the pool closed
    assert pool.dead() is not None or all(not p.is_alive() for p in pool.procs)
