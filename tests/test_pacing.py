"""Just-in-time pull pacing: the rates it learns, the pace it picks, the slices it cuts."""

from __future__ import annotations

import pytest
import torch

from dwdp.parallel.copy_engine import CpuCopyEngine
from dwdp.parallel.pacing import PullRates, slice_copies


def test_nothing_measured_means_full_rate_and_no_break_even():
    r = PullRates()
    assert r.pace(16384, 10**9) is None
    assert r.break_even_tokens(10**9) is None


def test_paced_pull_ends_at_margin_of_the_window():
    r = PullRates(margin=0.8, slice_bytes=32 << 20)
    r.observe(1000, [0.010, 0.012, 0.011], [(10**9, 0.004, None)])
    window, full = r.window_s(1000), r.full_rate_s(10**9)
    assert window == pytest.approx(0.011) and full == pytest.approx(0.004)
    pace = r.pace(1000, 10**9)
    slices = -(-10**9 // (32 << 20))
    # Planned: bytes at full rate, then per slice its gap and one slice's full-rate time.
    assert r.planned_s(10**9, pace) == pytest.approx(full + slices * (pace.gap_s + r.full_rate_s(32 << 20)))
    assert r.planned_s(10**9, pace) == pytest.approx(0.8 * window)
    # A window shorter than the full-rate pull: nothing to stretch.
    assert r.pace(300, 10**9) is None


def test_overrun_of_paced_pulls_is_learnt_and_planned_for():
    r = PullRates(margin=0.8, slice_bytes=10**8)
    r.observe(1000, [0.020], [(10**9, 0.004, None)])
    first = r.pace(1000, 10**9)
    assert r.stretch == 1.0 and r.planned_s(10**9, first) == pytest.approx(0.016)
    # That pull took 25% longer than planned (its gaps ran long): the next plan is shorter.
    r.observe(1000, [0.020], [(10**9, 1.25 * 0.016, first)])
    assert r.stretch == pytest.approx(1.25)
    second = r.pace(1000, 10**9)
    assert second.gap_s < first.gap_s
    assert 1.25 * r.planned_s(10**9, second) == pytest.approx(0.016)  # lands at 80% again
    # Overruns so large that even gap-less slices would be late: pull whole, at full rate,
    # while the learnt overrun decays so that pacing is tried again later.
    for _ in range(20):
        r.observe(1000, [0.020], [(10**9, 4 * r.planned_s(10**9, second), second)])
    assert r.pace(1000, 10**9) is None
    tries = [r.pace(1000, 10**9) for _ in range(40)]
    assert any(t is not None for t in tries)


def test_break_even_is_the_first_step_whose_window_hides_the_pull():
    r = PullRates()
    r.observe(2048, [0.02] * 4, [(3 * 10**9, 0.009, None)])
    be = r.break_even_tokens(3 * 10**9)
    assert r.window_s(be) >= r.full_rate_s(3 * 10**9) > r.window_s(be - 1)


def test_prediction_uses_the_fastest_recent_step_and_ignores_short_ones():
    r = PullRates(min_tokens=256)
    r.observe(4096, [0.040], [])
    r.observe(4096, [0.080], [])  # a slow step (waits, jitter) must not lengthen the prediction
    r.observe(100, [0.0001], [])  # launch-bound: says nothing about a long step
    assert r.window_s(4096) == pytest.approx(0.040)
    r.observe(1000, [0.0], [(100, float("nan"), None)])  # nothing usable
    assert r.full_rate_s(100) is None


def test_bad_margin_is_refused():
    with pytest.raises(ValueError, match="margin"):
        PullRates(margin=1.5)


def test_slices_cover_every_byte_and_alternate_between_peers():
    a, b = torch.arange(40.0).view(10, 4), torch.arange(100.0, 124.0).view(6, 4)
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    pieces = slice_copies([(da, a), (db, b)], slice_bytes=3 * 16)  # 3 rows of 16 bytes
    assert [len(s) for _, s in pieces] == [3, 3, 3, 3, 3, 1]  # a0 b0 a1 b1 a2 a3
    assert pieces[0][1].data_ptr() == a.data_ptr() and pieces[1][1].data_ptr() == b.data_ptr()
    for dst, src in pieces:
        dst.copy_(src)
    assert torch.equal(da, a) and torch.equal(db, b)


def test_cpu_engine_paced_submission_copies_everything_and_takes_the_gaps():
    from dwdp.parallel.pacing import Pace

    eng = CpuCopyEngine()
    try:
        src = torch.randn(64, 256)
        dst = torch.zeros_like(src)
        sig = eng.submit([(dst, src)], nbytes=src.numel() * 4, pace=Pace(slice_bytes=16 * 256 * 4, gap_s=0.02))
        eng.compute_wait(sig)
        assert torch.equal(dst, src)
        assert eng.copy_seconds(sig) >= 4 * 0.02  # four slices, a gap after each
    finally:
        eng.close()
