"""Disaggregated serving on CPU: a DWDP (or DEP) prefill group in separate processes hands
each request's KV cache to decode in the server process; greedy output equals
transformers' generate; a dead prefill or decode rank loses no request (what it held runs
again and completes), the server reports degraded at once, prefills locally meanwhile and
restarts the group."""

from __future__ import annotations

import logging
import re
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


def _greedy(ref, prompt, n):
    return ref.hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()


def _warnings(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_dead_prefill_rank_loses_no_request_then_the_group_restarts(ref_cases, monkeypatch, caplog):
    """Rank 1 of a DWDP prefill group dies (os._exit, through the DWDP_FAULT hook) as it
    takes its first request, with requests in flight in the group: every request completes
    with transformers' greedy output (what the dead group held is prefilled again in the
    server process), the failure and the restart are logged at WARNING, the restarted group
    serves; once the restarts are used up, prompts are prefilled in the server process."""
    ref = ref_cases["qwen3_moe"]
    caplog.set_level(logging.WARNING, logger="dwdp.serve")
    monkeypatch.setenv("DWDP_FAULT", "prefill-request:1:1")
    pool = PrefillPool(PrefillPoolSpec(str(ref.path), "dwdp", 2, max_num_tokens=24, peer_timeout_s=5),
                       ready_timeout_s=120)
    monkeypatch.delenv("DWDP_FAULT")  # the restarted group is spawned without it: it runs clean
    worker = DisaggServingWorker(ref.ours(), pool, max_pool_restarts=1)
    old = list(pool.procs)
    worker.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        reqs = [worker.submit(ServeRequest(p, params)) for p in PROMPTS[:3]]
        for p, r in zip(PROMPTS[:3], reqs):
            assert _collect(r, timeout=60) == (_greedy(ref, p, 4), "length"), p[:3]
        failed = _warnings(caplog, "prefill group failed")
        assert len(failed) == 1 and "prefill rank 1" in failed[0], failed
        assert int(re.search(r"; (\d+) request\(s\) in flight", failed[0])[1]) >= 1  # rank 1 held one
        _wait_for(lambda: not any(p.is_alive() for p in old), 15, "the surviving rank reaped")
        _wait_for(lambda: worker.health()[0] == "ok", 120, "the prefill group restarted")
        assert worker.pool is not None and worker.pool is not pool and all(p.is_alive() for p in worker.pool.procs)
        assert worker.metrics.value("dwdp_prefill_pool_restarts_total") == 1
        assert _warnings(caplog, "prefill group restarted (attempt 1/1)")
        want = _greedy(ref, PROMPTS[3], 4)
        assert _collect(worker.submit(ServeRequest(PROMPTS[3], params)), timeout=60) == (want, "length")
        assert worker.pool.outstanding == 0 and sum(worker.pool.load) == 0  # it went through the new group
        # A second death: the restart budget (1) is spent, local prefill serves for good.
        worker.pool.procs[0].kill()
        _wait_for(lambda: "gave up" in (worker.health()[1] or ""), 10, "degraded for good")
        assert _warnings(caplog, "gave up after 1 restart")
        assert _collect(worker.submit(ServeRequest(PROMPTS[3], params)), timeout=60) == (want, "length")
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
    """Decode in a DEP group of 2 processes (5 of the 10 experts each, attention
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


def test_dead_decode_rank_loses_no_request_and_retries_are_bounded(ref_cases, monkeypatch, caplog):
    """A decode rank dies (os._exit through the DWDP_FAULT hook, after its 3rd step with
    requests of its own) while both ranks decode: every request resumes on the restarted
    group where its stream stood and completes with transformers' greedy output, no token
    missing or twice, logprobs one per token. Then a request running at two deaths in a
    row (max_request_retries=1) fails with an error saying so, after streaming a prefix of
    its greedy output; the restarts used up, health reads down."""
    from dwdp.serve.decode_pool import DecodePoolSpec, SupervisedDecodePool
    from dwdp.serve.worker import ServingWorker

    ref = ref_cases["qwen3_moe"]
    caplog.set_level(logging.WARNING, logger="dwdp.serve")
    monkeypatch.setenv("DWDP_FAULT", "decode-step:1:3")
    pool = SupervisedDecodePool(DecodePoolSpec(str(ref.path), 2, max_batch=2, max_context=256), max_restarts=2,
                                ready_timeout_s=120, max_request_retries=1)
    monkeypatch.delenv("DWDP_FAULT")
    first = pool.pool
    worker = ServingWorker(ref.ours(), max_num_tokens=24, max_batch=2, decode=pool)
    worker.start()
    try:
        n = 10  # both requests still running when rank 1 dies after its 3rd step
        reqs = [worker.submit(ServeRequest(PROMPTS[0], SamplingParams(max_tokens=n, temperature=0, logprobs=2))),
                worker.submit(ServeRequest(PROMPTS[1], SamplingParams(max_tokens=n, temperature=0)))]
        for p, r in zip(PROMPTS, reqs):
            assert _collect(r) == (_greedy(ref, p, n), "length"), p[:3]
        assert len(reqs[0].logprobs) == n
        assert first.routed == [1, 1] and pool.pool is not first and pool.restarts == 1  # both ran on the dead group
        failed = _warnings(caplog, "decode group failed")
        assert len(failed) == 1 and "decode rank 1 exited" in failed[0], failed
        assert "resuming the 2 request(s)" in failed[0]
        assert _warnings(caplog, "decode group restarted (attempt 1/2)")
        _wait_for(lambda: worker.health() == ("ok", None), 60, "health ok after the restart")
        # Two deaths in a row with the same request running: the second group's rank 1 is
        # killed mid-generation, the third group (spawned with the hook) loses rank 0.
        long = worker.submit(ServeRequest([1, 2, 3], SamplingParams(max_tokens=100, temperature=0)))
        _wait_for(lambda: pool.active and len(pool.active[0].tokens) > 3, 60, "decoding to start")
        monkeypatch.setenv("DWDP_FAULT", "decode-step:0:2")
        pool.pool.procs[1].kill()
        tokens, reason = _collect(long)
        assert reason.startswith("error") and "last 2 deaths" in reason, reason
        assert len(tokens) > 3 and tokens == _greedy(ref, [1, 2, 3], len(tokens))  # every streamed token once
        _wait_for(lambda: worker.health()[0] == "down", 60, "down")
        assert "gave up after 2 restart" in worker.health()[1]
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


def test_pool_specs_carry_the_projection_format_to_their_ranks():
    """`dwdp serve --dense-dtype` reaches the ranks of a prefill group and of a decode group."""
    from dwdp.serve.decode_pool import DecodePoolSpec

    assert PrefillPoolSpec("tiny-deepseek-v3", "dwdp", 2, dense_dtype="fp8").rank_spec(2).dense_dtype == "fp8"
    assert DecodePoolSpec("tiny-deepseek-v3", 2, dense_dtype="same").rank_spec().dense_dtype == "same"
    assert PrefillPoolSpec("tiny-deepseek-v3", "dwdp", 2).rank_spec(2).dense_dtype == "auto"
