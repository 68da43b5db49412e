"""Pull rates: the compute window and pull bandwidth a DWDP rank learns from its own steps,
the break-even step size they give, and the slices a sliced pull plan cuts."""

from __future__ import annotations

import pytest
import torch

from dwdp.parallel.copy_engine import slice_copies
from dwdp.parallel.pull_rates import PullRates


def test_nothing_measured_means_no_break_even():
    r = PullRates()
    assert r.break_even_tokens(10**9) is None
    r.observe(4096, [0.04], [])  # a window but no pull yet
    assert r.break_even_tokens(10**9) is None


def test_break_even_is_the_first_step_whose_window_hides_the_pull():
    r = PullRates()
    r.observe(2048, [0.02] * 4, [(3 * 10**9, 0.009)])
    be = r.break_even_tokens(3 * 10**9)
    assert r.window_s(be) >= r.full_rate_s(3 * 10**9) > r.window_s(be - 1)
    # 0.009 s of pull at 0.02 / 2048 s per token: 921.6 tokens
    assert be == 922


def test_prediction_uses_the_fastest_recent_step_and_ignores_short_ones():
    r = PullRates(min_tokens=256)
    r.observe(4096, [0.040], [])
    r.observe(4096, [0.080], [])  # a slow step (waits, jitter) must not lengthen the prediction
    r.observe(100, [0.0001], [])  # launch-bound: says nothing about a long step
    assert r.window_s(4096) == pytest.approx(0.040)
    r.observe(1000, [0.0], [(100, float("nan"))])  # nothing usable
    assert r.full_rate_s(100) is None


def test_slices_cover_every_byte_and_alternate_between_peers():
    a, b = torch.arange(40.0).view(10, 4), torch.arange(100.0, 124.0).view(6, 4)
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    pieces = slice_copies([(da, a), (db, b)], slice_bytes=3 * 16)  # 3 rows of 16 bytes
    assert [len(s) for _, s in pieces] == [3, 3, 3, 3, 3, 1]  # a0 b0 a1 b1 a2 a3
    assert pieces[0][1].data_ptr() == a.data_ptr() and pieces[1][1].data_ptr() == b.data_ptr()
    for dst, src in pieces:
        dst.copy_(src)
    assert torch.equal(da, a) and torch.equal(db, b)
