"""Token shipping (DWDP short steps send tokens to the experts' owners): the expert-range
partial sums against a float64 reference, and whole shipped steps on CPU process groups
against the single-process model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dwdp.models.moe import ExpertSegment, subset_experts_forward
from dwdp.parallel.launch import spawn_local
from dwdp.quant import dequantize_fp8_blockwise, quantize_fp8_blockwise
from dwdp_workers import logits_worker, reference_logits, shipping_timeout_worker

BATCHES = [[[5, 9, 2, 7, 1, 3], list(range(40, 77)), [11]], [list(range(100, 164))], [[3, 1, 4, 1, 5], [9, 2, 6]]]


def _moe64(x, ids, w, w13, w2):
    """sum_k w[t,k] * SwiGLU expert ids[t,k] of x[t], in float64, one token at a time."""
    x, w13, w2, w = x.double(), w13.double(), w2.double(), w.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += w[t, k] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("fp8", [False, True])
def test_expert_range_shares_sum_to_the_whole_moe(fp8):
    g = torch.Generator().manual_seed(0)
    E, K, T, H, I = 10, 3, 23, 128, 128
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    if fp8:
        q13, s13 = zip(*(quantize_fp8_blockwise(w13[e]) for e in range(E)))
        q2, s2 = zip(*(quantize_fp8_blockwise(w2[e]) for e in range(E)))
        q13, s13, q2, s2 = map(torch.stack, (q13, s13, q2, s2))
        seg = lambda a, b: ExpertSegment(a, q13[a:b], q2[a:b], s13[a:b], s2[a:b])  # noqa: E731
        ref = _moe64(x, ids, w, dequantize_fp8_blockwise(q13, s13, torch.float32),
                     dequantize_fp8_blockwise(q2, s2, torch.float32))
    else:
        seg = lambda a, b: ExpertSegment(a, w13[a:b], w2[a:b])  # noqa: E731
        ref = _moe64(x, ids, w, w13, w2)
    for cuts in ([0, 4, 10], [0, 3, 7, 10], [0, 10]):
        parts = [subset_experts_forward(x, ids, w, seg(a, b)) for a, b in zip(cuts, cuts[1:])]
        got = sum(parts).double()
        err = (got - ref).norm() / ref.norm()
        assert err < 1e-5, (cuts, float(err))
    # A range no token is routed to contributes exact zeros (no unwritten rows leak in).
    none = subset_experts_forward(x, torch.zeros_like(ids), w, seg(5, 10))
    assert torch.equal(none, torch.zeros_like(none))


@pytest.fixture(scope="module")
def models(ref_cases):
    return {"qwen3": str(ref_cases["qwen3_moe"].path), "dsv3": str(ref_cases["deepseek_v3"].path)}


def _reference(spec, batches):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [t.numpy() for t in reference_logits(spec, batches)]
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("group_size", [2, 3])
def test_shipped_steps_match_the_single_process_model(models, group_size):
    """Every step ships (pulls nothing, no collective); outputs equal the reference to fp32
    rounding (the shares are summed in another order than one combine)."""
    cases = [(models["qwen3"], None), (models["dsv3"], None)]
    ranks = spawn_local(logits_worker, group_size,
                        (group_size, cases, BATCHES, {"short_steps": "ship", "count_collectives": True}), timeout_s=300)
    for c, (spec, _) in enumerate(cases):
        ref = _reference(spec, BATCHES)
        for r, res in enumerate(ranks):
            case = res["cases"][c]
            for b, (got, want) in enumerate(zip(case["logits"], ref)):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{spec} rank {r} batch {b}")
            assert [nbytes for _, nbytes in case["stats"]] == [0] * len(BATCHES)
            assert all(s > 0 for s in case["shipped_bytes"])
    for res in ranks:
        assert res["collectives_during_steps"] == {}


def test_short_steps_ship_while_peers_pull(models):
    """--ship-max-tokens 10: the 8-token batch ships, the others pull; ranks run the batches
    in rotated order, so an owner serves shipped tokens while it runs its own pulled step."""
    spec = models["dsv3"]
    ranks = spawn_local(logits_worker, 3, (3, [(spec, None)], BATCHES,
                                           {"short_steps": "ship", "ship_max_tokens": 10, "rotate": True}),
                        timeout_s=300)
    ref = _reference(spec, BATCHES)
    for r, res in enumerate(ranks):
        case = res["cases"][0]
        order = [(r + i) % 3 for i in range(3)]
        for got, b in zip(case["logits"], order):
            np.testing.assert_allclose(got, ref[b], rtol=1e-4, atol=1e-4, err_msg=f"rank {r} batch {b}")
        shipped = [s > 0 for s in case["shipped_bytes"]]
        pulled = [n > 0 for _, n in case["stats"]]
        assert shipped == [b == 2 for b in order] and pulled == [b != 2 for b in order]


def test_an_owner_that_stops_serving_is_a_clear_error_not_a_hang():
    res = spawn_local(shipping_timeout_worker, 2, (2, 2.0), timeout_s=120)
    msg, seconds = res[0]
    assert "TransportTimeout" in msg and "rank 1" in msg and "shipped" in msg, msg
    assert 1.5 < seconds < 6  # one timeout, not one per layer


def test_which_steps_ship():
    """pull: none; ship: every step the boxes hold; auto: those below the measured
    break-even size (none while it is unmeasured). The short-step hold is off whenever
    short steps ship (holding them would only delay them)."""
    from types import SimpleNamespace

    from dwdp.parallel.dwdp import DWDPRuntime
    from dwdp.parallel.strategies import STRATEGIES

    shipper = SimpleNamespace(fits=lambda t: 0 < t <= 2048)
    for policy, be, want in (("pull", 1000, [False, False, False]), ("ship", None, [True, True, False]),
                             ("auto", 1000, [True, False, False]), ("auto", None, [False, False, False])):
        rt = SimpleNamespace(shipper=shipper, short_steps=policy, break_even_tokens=lambda be=be: be)
        assert [DWDPRuntime.ships(rt, t) for t in (500, 1500, 4096)] == want, policy
        hold = STRATEGIES["dwdp"].short_step_hold(rt, 3.0)
        assert (hold is None) == (policy != "pull"), policy
