"""DWDP runtime on CPU with real, separate processes (shared-memory peer storage, copy thread).

Each rank's outputs must equal the single-process reference bit for bit: on CPU both run
the same per-expert kernels on the same rows, only the place the weights are read from
differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dwdp.parallel.launch import SpawnError, spawn_local
from dwdp.strategy.placement import Placement
from dwdp.presets import resolve_model
from dwdp_workers import failure_worker, logits_worker, mismatch_worker, reference_logits

BATCHES = [[[5, 9, 2, 7, 1, 3], list(range(40, 77)), [11]], [list(range(100, 164))], [[3, 1, 4, 1, 5], [9, 2, 6]]]


@pytest.fixture(scope="module")
def models(ref_cases):
    """Checkpoint dirs of the tiny HF references: qwen3 has 10 experts (not divisible by
    3 or 4), deepseek-v3 12 (group-limited routing, shared expert, MLA)."""
    return {"qwen3": str(ref_cases["qwen3_moe"].path), "dsv3": str(ref_cases["deepseek_v3"].path)}


def _reference(spec, batches=BATCHES):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: same reduction order, bitwise comparable
    try:
        return [t.numpy() for t in reference_logits(spec, batches)]
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("group_size,cases", [
    (2, [("qwen3", None), ("qwen3", 6), ("dsv3", None), ("dsv3", 8)]),
    (3, [("qwen3", None), ("qwen3", 6), ("dsv3", None), ("dsv3", 6)]),
    (4, [("qwen3", None), ("qwen3", 7), ("dsv3", None), ("dsv3", 6)]),
])
def test_every_rank_matches_single_process_reference(models, group_size, cases):
    resolved = [(models[m], L) for m, L in cases]
    ranks = spawn_local(logits_worker, group_size, (group_size, resolved, BATCHES, {"count_collectives": True}),
                        timeout_s=300)
    for c, (spec, L) in enumerate(resolved):
        ref = _reference(spec)
        for r, res in enumerate(ranks):
            for b, (got, want) in enumerate(zip(res["cases"][c]["logits"], ref)):
                assert np.array_equal(got, want), (
                    f"N={group_size} {cases[c]} rank {r} batch {b}: max diff {np.abs(got - want).max()}")
            # Every step pulled every remote expert of every MoE layer, no more.
            cfg = resolve_model(spec)[0]
            remote = Placement.create(cfg.num_experts, group_size, L).remote
            want_bytes = len(cfg.moe_layers) * remote * cfg.expert_numel() * 4
            assert [nbytes for _, nbytes in res["cases"][c]["stats"]] == [want_bytes] * len(BATCHES)
    for r, res in enumerate(ranks):
        assert res["collectives_during_steps"] == {}, f"rank {r} issued collectives during steps"


def test_random_delays_in_copies_and_compute_keep_outputs_identical(models):
    """Ordering stress: random sleeps before each copy and before each slot wait. With
    both waits in place outputs stay bitwise identical."""
    cases = [(models["qwen3"], None), (models["dsv3"], 8)]
    ranks = spawn_local(logits_worker, 2, (2, cases, BATCHES, {"copy_delay_ms": 15, "compute_delay_ms": 10}),
                        timeout_s=300)
    for c, (spec, _) in enumerate(cases):
        ref = _reference(spec)
        for res in ranks:
            for got, want in zip(res["cases"][c]["logits"], ref):
                assert np.array_equal(got, want)
            # The same steps measured the compute window and the pull rate: a break-even size.
            assert res["cases"][c]["break_even_tokens"] >= 1


@pytest.mark.parametrize("slice_bytes", [None, 3000])
def test_three_ranks_per_peer_parts_and_sliced_plans_under_random_delays(models, slice_bytes):
    """N=3: each layer's pulls come in one part per peer (whole blocks; the MoE waits for
    each peer's part separately) or as one part of slices interleaved over both peers."""
    cases = [(models["qwen3"], None), (models["dsv3"], 6)]
    ranks = spawn_local(logits_worker, 3, (3, cases, BATCHES, {"copy_delay_ms": 10, "compute_delay_ms": 10,
                                                               "slice_bytes": slice_bytes}), timeout_s=300)
    for c, (spec, _) in enumerate(cases):
        ref = _reference(spec)
        for res in ranks:
            for got, want in zip(res["cases"][c]["logits"], ref):
                assert np.array_equal(got, want)


def test_removing_the_read_after_write_wait_breaks_outputs(models):
    """The same stress with the MoE no longer waiting for its slot's copies: it reads
    experts of an older layer (or half-written ones) and the logits change. This shows
    the read-after-write wait is what keeps the test above green."""
    cases = [(models["qwen3"], None)]
    ranks = spawn_local(logits_worker, 2, (2, cases, BATCHES, {"copy_delay_ms": 30, "skip_raw_wait": True}),
                        timeout_s=300)
    ref = _reference(cases[0][0])
    mismatches = sum(not np.array_equal(got, want) for res in ranks for got, want in zip(res["cases"][0]["logits"], ref))
    assert mismatches > 0


@pytest.mark.parametrize("mode", ["exit", "stop"])
def test_dead_or_frozen_peer_fails_the_group(mode):
    """Rank 0 keeps stepping while rank 1 dies or freezes: its watchdog (3 s peer timeout)
    must stop it with PeerFailure naming rank 1; without the watchdog the worker's loop
    would end without an error."""
    with pytest.raises(SpawnError) as err:
        spawn_local(failure_worker, 2, (2, mode, 3.0), timeout_s=120)
    msg = str(err.value)
    assert "rank 0: PeerFailure" in msg and "peer rank 1" in msg, msg


def test_ranks_disagreeing_on_the_model_fail_at_setup():
    with pytest.raises(SpawnError) as err:
        spawn_local(mismatch_worker, 2, (2,), timeout_s=120)
    msg = str(err.value)
    assert "SetupMismatch" in msg and "model config" in msg, msg
