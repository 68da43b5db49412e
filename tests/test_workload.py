"""Workload generation, rank assignment, router skew and the lockstep driver."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from dwdp.engine import ArrivalSource, PrefillEngine, Request, ShortStepHold, StepDriver
from dwdp.models import build_model, init_random
from dwdp.memory import rank_memory
from dwdp.memory import DoesNotFit, check_fits
from dwdp.presets import resolve_model
from dwdp.workload import WorkloadSpec, apply_router_skew, assign, generate, sample_lengths, zipf_router_bias


def lengths(spec, max_len=100_000):
    return [len(r.prompt) for r in generate(spec, 50, max_len)]


def test_fixed_and_uniform_lengths():
    assert lengths(WorkloadSpec(num_requests=5, isl=40)) == [40] * 5
    ls = lengths(WorkloadSpec(num_requests=400, isl=1000, dist="uniform", ratio=0.8))
    assert min(ls) >= 800 and max(ls) <= 1000
    assert 850 < np.mean(ls) < 950  # U[800, 1000] has mean 900


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
def test_cv_is_what_was_asked(dist):
    # The lengths generate() draws, without the 160M random token ids of 20000 prompts.
    spec = WorkloadSpec(num_requests=20000, isl=8192, dist=dist, cv=0.2, seed=3)
    ls = np.array(sample_lengths(spec, 100_000, np.random.default_rng(spec.seed)))
    assert abs(ls.mean() / 8192 - 1) < 0.01
    assert abs(ls.std() / ls.mean() - 0.2) < 0.01


def test_lengths_clipped_to_model_limit():
    ls = lengths(WorkloadSpec(num_requests=2000, isl=100, dist="normal", cv=1.0), max_len=150)
    assert min(ls) >= 1 and max(ls) == 150


def test_seeded_and_token_ids_in_vocab():
    a = generate(WorkloadSpec(num_requests=6, isl=30, dist="uniform", seed=4), 50, 512)
    b = generate(WorkloadSpec(num_requests=6, isl=30, dist="uniform", seed=4), 50, 512)
    c = generate(WorkloadSpec(num_requests=6, isl=30, dist="uniform", seed=5), 50, 512)
    assert [r.prompt for r in a] == [r.prompt for r in b] != [r.prompt for r in c]
    assert all(0 <= t < 50 for r in a for t in r.prompt)


def test_poisson_arrivals():
    reqs = generate(WorkloadSpec(num_requests=4000, isl=10, rate=50.0, seed=1), 50, 512)
    t = np.array([r.arrival for r in reqs])
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert abs(np.diff(t).mean() - 1 / 50) < 0.002
    assert all(r.arrival == 0 for r in generate(WorkloadSpec(num_requests=3, isl=10), 50, 512))


def test_trace(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in [{"input_len": 7, "arrival": 10.5},
                                                   {"input_len": 3, "arrival": 10.0}]) + "\n")
    reqs = generate(WorkloadSpec(dist="trace", trace=str(p)), 50, 512)
    assert [(len(r.prompt), r.arrival) for r in reqs] == [(3, 0.0), (7, 0.5)]
    p.write_text('{"input_len": 900, "arrival": 0}\n')
    with pytest.raises(ValueError, match="outside"):
        generate(WorkloadSpec(dist="trace", trace=str(p)), 50, 512)
    p.write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="t.jsonl:1"):
        generate(WorkloadSpec(dist="trace", trace=str(p)), 50, 512)


@pytest.mark.parametrize("kw,msg", [(dict(dist="gamma"), "unknown length distribution"),
                                    (dict(isl=5000), "max_position_embeddings"),
                                    (dict(ratio=0), "ratio"), (dict(rate=-1.0), "rate"),
                                    (dict(assign="random"), "unknown assignment"),
                                    (dict(dist="trace"), "--trace")])
def test_bad_workloads_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        generate(WorkloadSpec(**kw), 50, 512)


def test_assignment_policies():
    reqs = [Request(i, [0] * n) for i, n in enumerate([100, 10, 10, 10, 90, 10])]
    rr = assign(reqs, 2, "round_robin")
    assert [r.id for r in rr[0]] == [0, 2, 4] and [r.id for r in rr[1]] == [1, 3, 5]
    ll = assign(reqs, 2, "least_loaded")
    loads = [sum(len(r.prompt) for r in part) for part in ll]
    assert loads == [110, 120]  # round robin gives 200 vs 30
    assert sorted(r.id for part in ll for r in part) == list(range(6))


def test_zipf_skew_makes_experts_hot():
    cfg, _ = resolve_model("tiny-qwen3-moe")
    model = build_model(cfg)
    init_random(model, 0)
    x = torch.randn(4000, cfg.hidden_size)
    gate = model.moe_blocks()[0].gate

    def top_share():
        ids = gate(x)[1].flatten().tolist()
        return max(Counter(ids).values()) / len(ids)

    flat = top_share()
    apply_router_skew(model, 2.0, seed=0)
    hot = top_share()
    bias = zipf_router_bias(cfg.num_experts, 2.0, 0, 0)
    assert int(gate(x)[1][:, 0].mode().values) == int(bias.argmax())  # the rank-1 expert is the favourite
    assert hot > 2 * flat, (flat, hot)
    apply_router_skew(model, 0.0)
    assert gate.logit_bias is None and abs(top_share() - flat) < 1e-9


def test_lockstep_runs_dummy_steps_while_a_peer_is_busy():
    cfg, _ = resolve_model("tiny-qwen3-moe", 2)
    model = build_model(cfg)
    init_random(model, 0)
    engine = PrefillEngine(model, max_num_tokens=16, keep_kv=False)
    rounds = []

    def any_rank(flags):  # a fake peer that has work for 6 rounds
        rounds.append(1)
        return [flags[0] or len(rounds) <= 6, flags[1]]

    res = StepDriver(engine, ArrivalSource([Request(0, list(range(20)))]), sync=any_rank).run()
    assert [s.num_tokens for s in engine.steps] == [16, 4, 0, 0, 0, 0]  # 2 real steps, then dummies
    assert len(rounds) == 7  # the 7th round finds everyone idle and ends
    solo = PrefillEngine(model, max_num_tokens=16, keep_kv=False).run([Request(0, list(range(20)))])
    assert res[0].next_token == solo[0].next_token
    assert torch.allclose(res[0].logits, solo[0].logits)


class _SimulatedTime:
    """A run clock that moves only when the driver idles (steps take no time), so holding
    decisions are checked exactly, whatever the machine's load."""

    now = 0.0


class _SimulatedArrivals(ArrivalSource):
    def __init__(self, requests, t: _SimulatedTime):
        super().__init__(requests)
        self.t = t

    def wait(self, now: float, max_s: float | None) -> None:  # idle: jump ahead instead of sleeping
        gap = max(0.0, self.pending[0].arrival - now) if self.pending else 0.0
        self.t.now = now + (gap if max_s is None else min(gap, max_s))


class _SimulatedDriver(StepDriver):
    def __init__(self, *args, t: _SimulatedTime, **kwargs):
        super().__init__(*args, **kwargs)
        self.t = t

    def clock(self) -> float:
        return self.t.now


@pytest.mark.parametrize("hold_s,break_even,steps,held_s", [
    (0.0, 100, [[10], [10]], 0.0),  # no hold: the first request runs alone, then the second
    (2.0, 100, [[10, 10]], 0.15),  # held until the second arrival (0.15 s later), which joins the step
    (2.0, 15, [[10, 10]], 0.15),
    (2.0, 5, [[10], [10]], 0.0),  # the first step is already above break-even: never held
    (2.0, None, [[10], [10]], 0.0),  # nothing measured yet: never held
    (0.05, 100, [[10], [10]], 0.05),  # the hold runs out before the second arrival
])
def test_short_step_is_held_back_to_fill_up(hold_s, break_even, steps, held_s):
    cfg, _ = resolve_model("tiny-qwen3-moe", 2)
    model = build_model(cfg)
    init_random(model, 0)
    engine = PrefillEngine(model, max_num_tokens=64, keep_kv=False)
    reqs = [Request(0, list(range(10)), arrival=0.0), Request(1, list(range(10, 20)), arrival=0.15)]
    t = _SimulatedTime()
    driver = _SimulatedDriver(engine, _SimulatedArrivals(reqs, t), hold=ShortStepHold(hold_s, lambda: break_even), t=t)
    res = driver.run()
    assert sorted(r.id for r in res) == [0, 1]
    assert [[10] * s.num_seqs for s in engine.steps] == steps
    assert driver.held_s == pytest.approx(held_s)
    # Steps take no simulated time: a request's TTFT is how long it waited for its step.
    ttft = {r.id: r.ttft for r in res}
    assert ttft[1] == pytest.approx(0.0)
    assert ttft[0] == pytest.approx(0.15 if len(steps) == 1 else held_s)


def test_lockstep_ranks_never_hold():
    cfg, _ = resolve_model("tiny-qwen3-moe", 2)
    model = build_model(cfg)
    init_random(model, 0)
    driver = StepDriver(PrefillEngine(model, 64), ArrivalSource([]), sync=lambda f: f,
                        hold=ShortStepHold(1.0, lambda: 10**6))
    assert driver.hold is None


def test_replica_fit_check_names_the_numbers():
    cfg, _ = resolve_model("qwen3-235b-a22b")
    need = rank_memory(cfg, torch.bfloat16).total
    assert need > 400 * 2**30
    with pytest.raises(DoesNotFit, match=r"GiB of weights.*80.0 GiB.*Use dwdp or dep"):
        check_fits("dp", need, cfg, 16384, torch.bfloat16, torch.device("cuda"), total_memory=80 * 2**30)
    small, _ = resolve_model("tiny-qwen3-moe")
    check_fits("dp", rank_memory(small, torch.bfloat16).total, small, 256, torch.bfloat16,
               torch.device("cuda"), total_memory=80 * 2**30)
