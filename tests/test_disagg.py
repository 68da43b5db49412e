"""Disaggregated serving on CPU: a DWDP (or DEP) prefill group in separate processes hands
each request's KV cache to decode in the server process; greedy output equals
transformers' generate; a dead prefill rank fails the requests it held, the server
reports degraded at once, prefills locally meanwhile and restarts the group."""

from __future__ import annotations

import time

import pytest
import torch

from dwdp.sampling import SamplingParams
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
        if strategy == "dwdp":  # the prefill ranks' pull waits reach the server's metrics, summed exactly
            assert pool.stats_reports >= 1  # the ranks did report their steps' exposed wait
            assert worker.metrics.value("dwdp_prefill_exposed_wait_seconds_total") == pytest.approx(
                pool.exposed_wait_s, abs=1e-9)
    finally:
        worker.stop(10)


def _wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_dead_prefill_rank_fails_its_requests_then_the_server_recovers(ref_cases):
    ref = ref_cases["qwen3_moe"]
    pool = PrefillPool(PrefillPoolSpec(str(ref.path), "dwdp", 2, max_num_tokens=24, peer_timeout_s=5),
                       ready_timeout_s=120)
    worker = DisaggServingWorker(ref.ours(), pool, max_pool_restarts=1)
    old = list(pool.procs)
    send = pool.send

    def send_then_kill(rid, prompt):  # rank 1 dies with both requests in the group, deterministically
        send(rid, prompt)
        if len(pool.where) == 2:
            old[1].kill()
            old[1].join()

    pool.send = send_then_kill
    worker.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        reqs = [worker.submit(ServeRequest(p, params)) for p in PROMPTS[:2]]
        outs = [_collect(r, timeout=60) for r in reqs]
        failed = [o for o in outs if o[1].startswith("error")]
        assert failed and all("prefill rank 1" in o[1] for o in failed), outs
        state, reason = worker.health()
        assert state == "degraded" and "prefill rank 1" in reason and "attempt 1/1" in reason
        _wait_for(lambda: not any(p.is_alive() for p in old), 15, "the surviving rank reaped")
        # Meanwhile prompts are prefilled in the server process: correct, not 503.
        tokens, reason = _collect(worker.submit(ServeRequest(PROMPTS[2], params)), timeout=60)
        want = ref.hf.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               pad_token_id=0)[0, len(PROMPTS[2]):].tolist()
        assert (tokens, reason) == (want, "length")
        _wait_for(lambda: worker.health()[0] == "ok", 120, "the prefill group restarted")
        assert worker.pool is not None and worker.pool is not pool and all(p.is_alive() for p in worker.pool.procs)
        assert worker.metrics.value("dwdp_prefill_pool_restarts_total") == 1
        r = worker.submit(ServeRequest(PROMPTS[2], params))
        assert _collect(r, timeout=60) == (want, "length")
        assert worker.pool.outstanding == 0 and sum(worker.pool.load) == 0  # it went through the new group
        # A second death: the restart budget (1) is spent, local prefill serves for good.
        worker.pool.procs[0].kill()
        _wait_for(lambda: "gave up" in (worker.health()[1] or ""), 10, "degraded for good")
        assert _collect(worker.submit(ServeRequest(PROMPTS[2], params)), timeout=60) == (want, "length")
    finally:
        worker.stop(2)


def test_dead_idle_rank_is_reported_without_a_request(ref_cases):
    ref = ref_cases["qwen3_moe"]
    pool = PrefillPool(PrefillPoolSpec(str(ref.path), "dep", 2, max_num_tokens=24, peer_timeout_s=5),
                       ready_timeout_s=120)
    worker = DisaggServingWorker(ref.ours(), pool, max_pool_restarts=0)
    worker.start()
    try:
        assert worker.health() == ("ok", None)
        pool.procs[0].kill()
        # Noticed with no request in flight (the bound only guards against a hang).
        _wait_for(lambda: worker.health()[0] == "degraded", 30, "degraded")
        assert "prefill rank" in worker.health()[1]  # the dead one, or its peer's error
        _wait_for(lambda: not pool.procs[1].is_alive(), 15, "the surviving DEP rank reaped")
    finally:
        worker.stop(2)


def test_expert_parallel_decode_group_serves_like_transformers(ref_cases):
    """Issue 18: decode in a DEP group of 2 processes (5 of the 10 experts each, attention
    data parallel, lockstep with dummy steps): greedy output equals transformers' generate,
    requests spread over both ranks, a cancel frees its slot, every rank closes cleanly."""
    from dwdp.serve.decode_pool import DecodePool, DecodePoolSpec
    from dwdp.serve.worker import ServingWorker

    ref = ref_cases["qwen3_moe"]
    pool = DecodePool(DecodePoolSpec(str(ref.path), 2, max_batch=2, max_context=128), ready_timeout_s=120)
    worker = ServingWorker(ref.ours(), max_num_tokens=24, max_batch=2, decode=pool)
    worker.start()
    try:
        lengths = [6, 3, 8, 1, 5]
        prompts = PROMPTS + [[7, 7, 7]]
        reqs = [worker.submit(ServeRequest(p, SamplingParams(max_tokens=n, temperature=0)))
                for p, n in zip(prompts, lengths)]
        long = worker.submit(ServeRequest([1, 2, 3], SamplingParams(max_tokens=100)))
        for p, n, r in zip(prompts, lengths, reqs):
            tokens, reason = _collect(r)
            want = ref.hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)[0, len(p):].tolist()
            assert (tokens, reason) == (want, "length"), f"prompt {p[:3]}..."
        assert min(pool.routed) >= 2  # attention data parallel: both ranks decoded requests
        worker.cancel(long.id)
        _wait_for(lambda: not pool.active, 30, "the cancelled request to leave the decode group")
        assert sorted(pool.load) == [0, 0]
    finally:
        worker.stop(10)
    assert all(not p.is_alive() for p in pool.procs) and all(p.exitcode == 0 for p in pool.procs)


def test_dead_decode_rank_fails_its_requests_and_the_group_restarts(ref_cases):
    """Issue 18: a decode rank dies mid-generation. The requests the group was decoding fail
    with an error naming the rank (not a hang), health reads degraded while the group
    restarts, a request prefilled meanwhile waits and then decodes exactly as transformers;
    once the restarts are used up, health reads down."""
    from dwdp.serve.decode_pool import DecodePoolSpec, SupervisedDecodePool
    from dwdp.serve.worker import ServingWorker

    ref = ref_cases["qwen3_moe"]
    pool = SupervisedDecodePool(DecodePoolSpec(str(ref.path), 2, max_batch=2, max_context=256), max_restarts=1,
                                ready_timeout_s=120)
    worker = ServingWorker(ref.ours(), max_num_tokens=24, max_batch=2, decode=pool)
    worker.start()
    try:
        long = worker.submit(ServeRequest([1, 2, 3], SamplingParams(max_tokens=200, temperature=0)))
        _wait_for(lambda: pool.active and len(pool.active[0].tokens) > 3, 60, "decoding to start")
        first = pool.pool
        first.procs[1].kill()
        events = []
        while True:
            kind, val = long.events.get(timeout=30)
            events.append(kind)
            if kind in ("done", "error"):
                break
        assert kind == "error" and "decode" in val and "rank" in val, val
        assert worker.health()[0] == "degraded" and "restarting" in worker.health()[1]
        _wait_for(lambda: all(not p.is_alive() for p in first.procs), 15, "the surviving rank reaped")
        p, n = PROMPTS[0], 6
        r = worker.submit(ServeRequest(p, SamplingParams(max_tokens=n, temperature=0)))  # may wait for the restart
        want = ref.hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        assert _collect(r, timeout=120) == (want, "length")
        _wait_for(lambda: worker.health() == ("ok", None), 60, "health ok after the restart")
        assert pool.pool is not first and pool.restarts == 1
        pool.pool.procs[0].kill()  # restarts used up: down, with the reason
        _wait_for(lambda: worker.health()[0] == "down", 30, "down")
        assert "gave up after 1 restart" in worker.health()[1]
    finally:
        worker.stop(5)


def test_a_group_that_cannot_start_says_why():
    """Both pools start through serve/rank_group.py: a rank that fails while starting ends
    the start-up with its reason."""
    from dwdp.serve.decode_pool import DecodePool, DecodePoolSpec

    for make in (lambda: PrefillPool(PrefillPoolSpec("no-such-model", "dwdp", 2), ready_timeout_s=60),
                 lambda: DecodePool(DecodePoolSpec("no-such-model", 2), ready_timeout_s=60)):
        with pytest.raises(RuntimeError, match=r"(prefill|decode) rank \d failed to start: .*no-such-model"):
            make()


def test_kv_transport_is_checked_before_anything_starts():
    with pytest.raises(ValueError, match="choose from host, cuda_ipc"):
        PrefillPoolSpec("tiny-qwen3-moe", kv_transport="nvlink")
    with pytest.raises(ValueError, match="must run on CUDA.*kv_transport 'host'"):
        PrefillPoolSpec("tiny-qwen3-moe", device="cpu", kv_transport="cuda_ipc")


def test_kv_pack_round_trip_is_exact():
    """cuda_ipc sends a request's KV as one flat tensor (one IPC handle): the views the
    server unpacks are the rank's tensors, bit for bit, whatever their shapes."""
    from dwdp.serve.disagg import pack_kv, unpack_kv

    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(7, 2, 4, generator=g), torch.randn(7, 2, 4, generator=g)),
          (torch.randn(7, 16, generator=g), torch.randn(7, 3, generator=g)),  # MLA-like: latent, rope key
          (torch.randn(0, 2, 4, generator=g), torch.randn(0, 2, 4, generator=g))]
    flat, shapes = pack_kv(kv)
    assert flat.dim() == 1 and flat.numel() == sum(t.numel() for p in kv for t in p)
    back = unpack_kv(flat, shapes)
    assert len(back) == len(kv)
    for (a, b), (c, d) in zip(kv, back):
        assert torch.equal(a, c) and torch.equal(b, d)
