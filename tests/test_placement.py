"""DWDP expert placement: coverage, overlap, impossible settings."""

from __future__ import annotations

import pytest

from dwdp.strategy.placement import Placement, PlacementError, valid_local_counts


@pytest.mark.parametrize("E,N", [(12, 2), (12, 3), (12, 4), (10, 3), (10, 4), (256, 3), (256, 4), (128, 8), (7, 7)])
def test_every_rank_sees_every_expert_exactly_once(E, N):
    for L in valid_local_counts(E, N):
        pl = Placement(E, N, L)
        assert E == L + (N - 1) * pl.pull
        for r in range(N):
            have = list(pl.local_range(r))
            for pp in pl.pulls(r):
                owner = pl.local_range(pp.peer)
                got = list(range(pp.start, pp.start + pp.count))
                # the pulled run lies in the peer's shard at the stated offset
                assert got == list(owner)[pp.peer_offset:pp.peer_offset + pp.count]
                have += got
            assert sorted(have) == list(range(E)), (E, N, L, r)


def test_disjoint_default_and_overlap():
    pl = Placement.create(256, 4)
    assert (pl.local, pl.pull) == (64, 64)
    assert [pl.local_range(r).start for r in range(4)] == [0, 64, 128, 192]
    # 256 experts on 3 ranks: neighbours overlap by one expert
    pl3 = Placement.create(256, 3)
    assert (pl3.local, pl3.pull) == (86, 85)
    assert pl3.local_range(1) == range(85, 171)
    # larger L: fewer bytes to pull
    assert Placement(128, 4, 68).remote == 60


def test_impossible_settings_list_valid_choices():
    with pytest.raises(PlacementError, match=r"Valid L: 3, 6, 9"):
        Placement(12, 4, 4)
    with pytest.raises(PlacementError, match="exceeds"):
        Placement.create(4, 8)
    with pytest.raises(PlacementError, match="rank 5"):
        Placement.create(12, 4).local_range(5)


def test_memory_budget_picks_largest_fitting_local_count():
    gib = 2**30
    pl = Placement.for_memory_budget(128, 4, budget_bytes=60 * gib, fixed_bytes=10 * gib,
                                     expert_bytes_all_layers=0.5 * gib, expert_bytes_one_layer=0.01 * gib)
    need = 10 + pl.local * 0.5 + 2 * (128 - pl.local) * 0.01
    assert need <= 60
    bigger = [L for L in valid_local_counts(128, 4) if L > pl.local]
    assert all(10 + L * 0.5 + 2 * (128 - L) * 0.01 > 60 for L in bigger)
    with pytest.raises(PlacementError, match="budget"):
        Placement.for_memory_budget(128, 4, 1 * gib, 10 * gib, 0.5 * gib, 0.01 * gib)


def test_auto_local_experts_takes_the_largest_that_fits():
    """-L auto: weights (resident + both slots + non-expert) plus one step's activations
    within 92% of the GPU, for the largest valid L; the next valid L would not fit."""
    import torch

    from dwdp.memory import auto_local_experts, dwdp_rank_memory
    from dwdp.memory import activation_bytes
    from dwdp.presets import resolve_model

    cfg, _ = resolve_model("qwen3-235b-a22b", None)  # all 94 layers, FP8 experts, 4 ranks
    gib = 2**30
    need = lambda L, mnt: (dwdp_rank_memory(cfg, Placement(128, 4, L), dtype=torch.bfloat16,  # noqa: E731
                                            expert_dtype="fp8").total + activation_bytes(cfg, mnt, 2))
    valid = valid_local_counts(128, 4)
    for total_gib, mnt in ((139.8, 16384), (139.8, 32768), (100.0, 16384)):
        total = int(total_gib * gib)
        L = auto_local_experts(cfg, 4, torch.bfloat16, "fp8", mnt, 0.92 * total)
        assert need(L, mnt) <= 0.92 * total
        bigger = [x for x in valid if x > L]
        assert not bigger or need(bigger[0], mnt) > 0.92 * total
    # An H200 at MNT 16K keeps 62 of 128 experts (pulls 66, not 96); too little memory: the smallest L.
    assert auto_local_experts(cfg, 4, torch.bfloat16, "fp8", 16384, 0.92 * 139.8 * gib) == 62
    assert auto_local_experts(cfg, 4, torch.bfloat16, "fp8", 16384, 40 * gib) == 32


def test_auto_local_experts_on_cpu_runs_the_smallest_and_records_it(tmp_path):
    import json

    from dwdp.cli import main

    out = tmp_path / "a.json"
    assert main(["bench", "--num-requests", "2", "--isl", "24", "--strategies", "dwdp", "-L", "auto",
                 "--max-num-tokens", "32", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())["runs"][0]["spec"]
    assert spec["local_experts"] == valid_local_counts(12, 2)[0] and spec["local_experts_auto"] is True
    with pytest.raises(SystemExit):
        main(["bench", "-L", "most"])
