"""Disaggregated serving on CPU: a DWDP (or DEP) prefill group in separate processes hands
each request's KV cache to decode in the server process; greedy output equals
transformers' generate, and a dead prefill rank fails requests loudly."""

from __future__ import annotations


import pytest
import torch

from dwdp.decode import SamplingParams
from dwdp.serve.disagg import DisaggServingWorker, PrefillPool, PrefillPoolSpec
from dwdp.serve.worker import ServeRequest

PROMPTS = [[5, 9, 2, 7, 1, 3], list(range(40, 77)), [11, 12], list(range(100, 130))]


def _collect(req: ServeRequest, timeout=120):
    tokens = []
    while True:
        kind, val = req.events.get(timeout=timeout)
        if kind == "token":
            tokens.append(val)
        elif kind == "done":
            return tokens, val
        else:
            return tokens, f"error: {val}"


@pytest.mark.parametrize("strategy", ["dwdp", "dep"])
def test_disaggregated_greedy_equals_transformers(ref_cases, strategy):
    ref = ref_cases["qwen3_moe"]  # 10 experts over 2 prefill ranks
    pool = PrefillPool(PrefillPoolSpec(str(ref.path), strategy, 2, max_num_tokens=24), ready_timeout_s=120)
    worker = DisaggServingWorker(ref.ours(), pool, max_batch=3)
    worker.start()
    try:
        reqs = [worker.submit(ServeRequest(p, SamplingParams(max_tokens=6, temperature=0))) for p in PROMPTS]
        for p, r in zip(PROMPTS, reqs):
            tokens, reason = _collect(r)
            want = ref.hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   pad_token_id=0)[0, len(p):].tolist()
            assert (tokens, reason) == (want, "length"), f"{strategy} prompt {p[:3]}..."
        assert sorted(pool.load) == [0, 0]  # every routed prompt came back
        if strategy == "dwdp":  # the prefill ranks' pull waits reach the server's metrics
            assert "dwdp_prefill_exposed_wait_seconds_total" in worker.metrics.render()
            assert pool.exposed_wait_s >= 0
    finally:
        worker.stop(10)


def test_dead_prefill_rank_fails_requests(ref_cases):
    ref = ref_cases["qwen3_moe"]
    pool = PrefillPool(PrefillPoolSpec(str(ref.path), "dwdp", 2, max_num_tokens=24, peer_timeout_s=5),
                       ready_timeout_s=120)
    worker = DisaggServingWorker(ref.ours(), pool)
    worker.start()
    try:
        pool.procs[1].kill()
        pool.procs[1].join()
        reqs = [worker.submit(ServeRequest(p, SamplingParams(max_tokens=4, temperature=0))) for p in PROMPTS[:2]]
        for r in reqs:
            tokens, reason = _collect(r, timeout=60)
            assert reason.startswith("error") and "prefill rank" in reason
        assert worker.failure and "prefill rank 1" in worker.failure
    finally:
        worker.stop(2)
