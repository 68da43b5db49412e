"""DEP (attention DP + expert parallelism) in real processes (gloo) against the same
layer / model with every expert in one process.

Covers what the strategy-level tests (test_strategies.py) cannot steer: hand-made
routing where some ranks receive nothing, ranks with zero tokens, FP8 experts, FP8 rows
on the wire, and the per-step statistics (one host sync per
MoE layer, bytes sent = bytes received across the group).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dep_workers import dep_worker
from dwdp.parallel.launch import spawn_local

# tokens per rank (rank 1 has none in the first case), routing "uniform" or "rank0" (every
# token picks experts held by rank 0 only, so ranks 1 and 2 receive nothing).
LAYER_CASES = [
    {"tokens": [7, 0, 13], "routing": "uniform", "seed": 1},
    {"tokens": [5, 9, 4], "routing": "rank0", "seed": 2},
    {"tokens": [0, 0, 0], "routing": "uniform", "seed": 3},
    {"tokens": [1, 1, 1], "routing": "uniform", "seed": 4},  # dummy-step sized
    {"tokens": [40, 3, 0], "routing": "rank0", "seed": 5},
]
BATCHES = [  # per rank, one list of sequences per step (every rank steps together)
    [[[5, 9, 2, 7, 1, 3], list(range(40, 77))], [[11]]],
    [[[3, 1, 4]], [list(range(100, 140))]],
    [[list(range(200, 260))], [[0]]],
]


def _rel(got, want) -> float:
    if want.size == 0:
        return 0.0
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _run(dep_kw, cfg_kw=None, fp8=False, cases=LAYER_CASES, batches=BATCHES):
    return spawn_local(dep_worker, 3, (3, cfg_kw or {}, dep_kw, cases, batches, fp8), timeout_s=240)


def _check_layers(ranks, cases, tol=2e-5):
    for c, case in enumerate(cases):
        for r, res in enumerate(ranks):
            got, want = res["layers"][c]
            assert got.shape == want.shape == (case["tokens"][r], want.shape[1])
            assert np.isfinite(got).all()
            assert _rel(got, want) < tol, f"case {c} rank {r}: rel err {_rel(got, want):.2e}"


def _check_steps(ranks, tol=2e-5):
    for r, res in enumerate(ranks):
        for s, (got, want, st) in enumerate(res["steps"]):
            assert _rel(got, want) < tol, f"rank {r} step {s}: rel err {_rel(got, want):.2e}"
            assert int(got[-1].argmax()) == int(want[-1].argmax())
            # The nccl path synchronises with the host once per MoE layer (its counts exchange).
            assert st["host_syncs"] == st["moe_layers"] == st["layers"]
            assert st["transfer_s"] > 0 and st["wait_s"] > 0
            assert 0 <= st["compute_s"] <= st["step_s"]
            assert st["collective_s"] == pytest.approx(st["transfer_s"] + st["wait_s"], rel=1e-6)
    for s in range(len(ranks[0]["steps"])):  # what one rank sends to the others, the others receive
        stats = [res["steps"][s][2] for res in ranks]
        assert sum(x["sent_bytes"] for x in stats) == sum(x["received_bytes"] for x in stats) > 0


def test_dep_matches_single_process_skewed_and_empty_ranks():
    ranks = _run({})
    _check_layers(ranks, LAYER_CASES)
    _check_steps(ranks)


def test_dep_fp8_experts_match_single_process_fp8_model():
    """FP8 experts (128x128 block scales): on CPU both sides widen them the same way, so
    DEP equals the single-process FP8 model up to summation order (as test_strategies)."""
    ranks = _run({}, cfg_kw={"hidden": 128}, fp8=True)
    _check_layers(ranks, LAYER_CASES)
    _check_steps(ranks)


def test_dep_fp8_wire_rows_are_quantised_once_per_token():
    """wire="fp8": rows travel as e4m3 + per-token 1x128 scales. The result must equal the
    single-process layer fed with the quantise-dequantised activations (an independent
    quantiser in the worker), so packing, scales and ids/weights all survive the trip."""
    ranks = _run({"wire": "fp8"}, cfg_kw={"hidden": 256, "experts": 9, "top_k": 3}, fp8=True,
                 batches=[[], [], []])
    _check_layers(ranks, LAYER_CASES)
    # And it is not the unquantised answer: the wire really carried FP8.
    plain = _run({}, cfg_kw={"hidden": 256, "experts": 9, "top_k": 3}, fp8=True, batches=[[], [], []])
    got, plain_got = ranks[0]["layers"][0][0], plain[0]["layers"][0][0]
    assert 1e-4 < _rel(got, plain_got) < 0.1


def test_dep_options_validated():
    from dwdp.models import build_model, init_random
    from dwdp.parallel.ep import apply_dep
    from dep_workers import tiny_config

    m = init_random(build_model(tiny_config(), torch.float32, "cpu"), 0)
    with pytest.raises(ValueError, match="wire 'fp4'"):
        apply_dep(m, None, 0, 1, wire="fp4")


def test_dep_decode_in_lockstep_equals_single_process():
    """Decode across ranks with expert parallelism: each rank decodes its own
    requests with its expert share; rank 1 has one short request, so it runs dummy steps
    while rank 0 still decodes. Tokens equal the full single-process model's."""
    from dep_workers import dep_decode_worker

    prompts = [[[5, 9, 2, 7, 1, 3], list(range(40, 77)), [11, 4]], [[8, 8, 1]]]
    out = spawn_local(dep_decode_worker, 2, (prompts, [10, 3]), timeout_s=240)
    for rank, (got, want, dummies, steps, dep_steps) in enumerate(out):
        assert got == want and len(got) == len(prompts[rank])
        assert all(len(t) == (10, 3)[rank] for t in got.values())
    (_, _, d0, s0, n0), (_, _, d1, s1, n1) = out
    assert d0 == 0 and d1 > 0 and s0 == s1 + d1  # same number of forwards on both ranks
    assert n0 == s0 and n1 == s1 + d1  # the DEP runtime accounts each decode forward, dummies included


def test_a2a_ceiling_buffer_chunks_are_4k_aligned():
    """The all-to-all ceiling's buffer: every peer's chunk a whole number of 4 KiB and the
    buffer no larger than asked, at the odd sizes one step's dispatch gives."""
    from dwdp.ceilings import a2a_numel

    for nbytes in (490_733_568, 981_467_136, 254_803_968 + 6, 1 << 30, 3_000):
        for ranks in (2, 4, 8):
            numel = a2a_numel(nbytes, ranks)
            chunk_bytes = numel // ranks * 2
            assert numel % ranks == 0 and chunk_bytes % 4096 == 0
            assert numel * 2 <= max(nbytes, 4096 * ranks)
            assert nbytes - numel * 2 < 4096 * ranks  # rounds down by less than a chunk per peer


def test_dep_plan_counts_its_all_to_all_buffers():
    """The fit check prices what DEP allocates beyond a dense step's activations: per MoE
    layer the dispatch rows (min(N, k) destinations per token), the rows received and the
    partial / combined rows, all growing with the step budget; a group of one sends nothing."""
    from dwdp.memory import rank_memory
    from dwdp.presets import resolve_model
    from dwdp.strategy.registry import describe
    from dwdp.strategy.spec import RankSpec
    from dwdp.strategy.wire import dep_buffer_bytes, expected_dest_ranks, wire_row_bytes

    cfg, _ = resolve_model("qwen3-235b-a22b", 2)
    dep = describe("dep")
    sizes = {}
    for mnt in (8192, 16384):
        plan = dep.plan(cfg, RankSpec(model="qwen3-235b-a22b", strategy="dep", max_num_tokens=mnt, device="cuda",
                                      expert_dtype="fp8"), torch.bfloat16, 4, 0)
        sizes[mnt] = plan.weight_bytes - rank_memory(cfg, torch.bfloat16, "fp8", cfg.num_experts // 4).total
    # FP8 experts on a GPU: FP8 rows on the wire (4096 + 128 scale bytes + ids and weights per row).
    width = wire_row_bytes(cfg.hidden_size, cfg.top_k, True)
    assert width < 2 * cfg.hidden_size
    dest = expected_dest_ranks(cfg, 4)
    want = 16384 * (4 * width + dest * width + 2 * dest * cfg.hidden_size * 2)
    assert sizes[16384] == pytest.approx(want, rel=1e-6) and sizes[16384] == pytest.approx(2 * sizes[8192], rel=1e-6)
    assert 1.3 * 2**30 < sizes[16384] < 1.5 * 2**30  # the 1.4 GiB missing from the 4x H200 estimate
    one = dep.plan(cfg, RankSpec(model="qwen3-235b-a22b", strategy="dep", max_num_tokens=16384), torch.bfloat16, 1, 0)
    assert one.weight_bytes == rank_memory(cfg, torch.bfloat16, "same", cfg.num_experts).total
    assert dep_buffer_bytes(cfg, 1, 16384, False) == 0
