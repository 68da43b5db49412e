"""What ``dwdp plan`` computes: predictions, crossover, recommended group, sweeps, and the
check of predictions against ``dwdp bench`` measurements."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..memory import FIT_HEADROOM
from ..strategy.placement import PlacementError, valid_local_counts
from ..strategy.registry import describe
from ..strategy.spec import DEP, DP, DWDP
from ..workload import WorkloadSpec, assign, generate
from .hardware import HardwareProfile
from .model import CostModel, Prediction, pack_steps
from .ttft import simulate_ttft

GiB = 2**30


@dataclass
class PlanInput:
    cfg: ModelConfig
    hw: HardwareProfile
    expert_dtype: str = "bf16"
    group_size: int = 4
    local_experts: int | None = None
    workload: WorkloadSpec = None  # num_requests is per rank here
    mnt: int = 16384
    skew: float = 0.0
    sliced: bool = False
    balance_tail: bool = False
    dense_dtype: str = "bf16"  # "fp8": dense projections in FP8 (a vendor engine on an FP8 checkpoint)

    def cost_model(self) -> CostModel:
        return CostModel(self.cfg, self.hw.for_model(self.cfg.name or ""), self.expert_dtype,
                         dense_dtype=self.dense_dtype)

    def requests(self, world: int | None = None) -> list[list[tuple[float, int]]]:
        """Per rank, (arrival seconds, prompt length) of its requests, with the workload's
        arrival process (all at 0 when it has no rate)."""
        world = world or self.group_size
        wl = copy.deepcopy(self.workload)
        wl.num_requests = self.workload.num_requests * world
        reqs = generate(wl, 2, self.cfg.max_position_embeddings)
        return [[(r.arrival, len(r.prompt)) for r in part] for part in assign(reqs, world, wl.assign)]

    def lengths(self, world: int | None = None) -> list[list[int]]:
        world = world or self.group_size
        wl = copy.deepcopy(self.workload)
        wl.num_requests = self.workload.num_requests * world
        wl.rate = None
        reqs = generate(wl, 2, self.cfg.max_position_embeddings)
        return [[len(r.prompt) for r in part] for part in assign(reqs, world, wl.assign)]


def memory_per_gpu(cfg: ModelConfig, strategy: str, n: int, local: int | None, expert_dtype: str, mnt: int,
                   dense_dtype: str = "bf16") -> float:
    """Bytes per GPU of ``strategy`` as the planner prices it (see
    :meth:`~dwdp.strategy.base.StrategyDescription.memory_per_gpu`)."""
    return describe(strategy).memory_per_gpu(cfg, n, local, expert_dtype, mnt, dense_dtype)


def predict(cm: CostModel, per_rank_lengths: list[list[int]], mnt: int, strategy: str, n: int,
            local: int | None = None, skew: float = 0.0, sliced: bool = False, seed: int = 0,
            balance_tail: bool = False) -> Prediction:
    """``strategy``'s step times for each rank's prompts, packed by the engine's scheduler."""
    desc = describe(strategy)
    # As the bench does: a lockstep group keeps the plain scheduler (equal steps would only
    # lengthen the steps its group waits for).
    plans = [pack_steps(ls, mnt, balance_tail and not desc.lockstep) for ls in per_rank_lengths]
    return desc.predict(cm, plans, n, local, skew, sliced, seed, sum(map(sum, per_rank_lengths)))


def predict_all(p: PlanInput, strategies=(DP, DEP, DWDP)) -> dict[str, Prediction]:
    cm = p.cost_model()
    lengths = p.lengths()
    return {s: predict(cm, lengths, p.mnt, s, p.group_size, p.local_experts, p.skew, p.sliced,
                       balance_tail=p.balance_tail) for s in strategies}


def crossover(p: PlanInput, isls=(1024, 2048, 4096, 8192, 16384, 32768, 65536), batch_one: bool = False):
    """Predicted dwdp / dep TPS ratio over ISL; the first ISL from which dwdp wins.

    batch_one: one prompt per step (MNT = ISL), the authors' roofline setting."""
    rows, first = [], None
    for isl in isls:
        if isl > p.cfg.max_position_embeddings:
            continue
        q = copy.deepcopy(p)
        q.workload.isl = isl
        if batch_one:
            q.mnt = isl
            q.workload.dist, q.workload.num_requests = "fixed", 1
        else:  # enough requests for several full steps per rank
            q.workload.num_requests = max(p.workload.num_requests, -(-4 * p.mnt // isl))
        pr = predict_all(q, (DEP, DWDP))
        ratio = pr[DWDP].tps_per_gpu / pr[DEP].tps_per_gpu
        rows.append((isl, pr[DEP].tps_per_gpu, pr[DWDP].tps_per_gpu, ratio))
        if first is None and ratio > 1:
            first = isl
    return rows, first


def recommend(p: PlanInput, memory_gib: float | None = None, max_group: int | None = None):
    """Best predicted dwdp (N, L) that fits the memory budget; rows for every candidate."""
    budget = (memory_gib or p.hw.memory_gib * FIT_HEADROOM) * GiB
    E = p.cfg.num_experts
    rows = []
    sizes = [n for n in (2, 3, 4, 6, 8, 12, 16, 24, 32, 36, 48, 64, 72) if n <= min(max_group or p.hw.domain, E)]
    for n in sizes:
        cands = valid_local_counts(E, n)
        for L in sorted(set([cands[0], cands[len(cands) // 4], cands[len(cands) // 2]])):
            try:
                mem = memory_per_gpu(p.cfg, DWDP, n, L, p.expert_dtype, p.mnt, p.dense_dtype)
            except PlacementError:
                continue
            q = copy.deepcopy(p)
            q.group_size, q.local_experts = n, L
            pr = predict_all(q, (DWDP,))[DWDP]
            rows.append({"N": n, "L": L, "memory_gib": mem / GiB, "fits": mem <= budget, "tps_per_gpu": pr.tps_per_gpu})
    fitting = [r for r in rows if r["fits"]]
    best = max(fitting, key=lambda r: r["tps_per_gpu"]) if fitting else None
    return rows, best


def sweep(p: PlanInput, what: str, values: list[float]):
    rows = []
    for v in values:
        q = copy.deepcopy(p)
        if what == "isl":
            q.workload.isl = int(v)
            q.workload.num_requests = max(p.workload.num_requests, -(-4 * p.mnt // int(v)))  # full steps
        elif what == "mnt":
            q.mnt = int(v)
        elif what == "cv":
            q.workload.cv = v
        elif what == "skew":
            q.skew = v
        else:
            raise ValueError(f"--sweep takes isl, mnt, cv or skew, not {what!r}")
        pr = predict_all(q, (DEP, DWDP))
        rows.append({what: v, DEP: pr[DEP].tps_per_gpu, DWDP: pr[DWDP].tps_per_gpu,
                     "ratio": pr[DWDP].tps_per_gpu / pr[DEP].tps_per_gpu,
                     "dep_sync_share": pr[DEP].extra["sync_share"]})
    return rows


def validate(runs: list, hw: HardwareProfile) -> list[dict]:
    """Predicted vs measured for each (run, strategy) of ``dwdp bench`` runs
    (:class:`~dwdp.bench.schema.BenchRun`, as :func:`~dwdp.bench.schema.load_runs` reads them)."""
    from ..presets import resolve_model

    out = []
    for run in runs:
        spec = run.spec
        cfg, _ = resolve_model(spec["model"], spec.get("num_layers"))
        wl = WorkloadSpec(**spec["workload"])
        reqs = generate(wl, 2, cfg.max_position_embeddings)
        world = spec["world_size"]
        parts = assign(reqs, world, wl.assign)
        lengths = [[len(r.prompt) for r in part] for part in parts]
        arrivals = [[(r.arrival, len(r.prompt)) for r in part] for part in parts]
        n = spec.get("group_size") or world
        fmt = "fp8" if spec.get("expert_dtype") == "fp8" else "bf16"
        cm = CostModel(cfg, hw.for_model(spec["model"]), fmt)
        for strat, res in run.results.items():
            if res.skipped or res.diagnostic:
                continue
            pr = predict(cm, lengths, run.mnt, strat, n, spec.get("local_experts"), spec.get("skew", 0.0),
                         bool(spec.get("slice_mb")), balance_tail=bool(spec.get("balance_tail")))
            # Compare the mean time of real (non-dummy) steps, and throughput.
            meas_steps = [s for r in res.ranks for s, t in zip(r.step_seconds, r.step_tokens) if t]
            pred_real = []
            for rk, steps in enumerate(pr.step_s):
                real = sum(1 for t in res.ranks[rk].step_tokens if t)
                pred_real += steps[:real]
            tt = simulate_ttft(cm, arrivals, run.mnt, strat, n, spec.get("local_experts"), spec.get("skew", 0.0),
                               bool(spec.get("slice_mb")), balance_tail=bool(spec.get("balance_tail")))
            ttft = {}
            if res.ttft_s is not None:
                ttft = {"measured_ttft_p50_s": res.ttft_s.p50, "predicted_ttft_p50_s": tt["ttft_p50_s"],
                        "measured_ttft_p90_s": res.ttft_s.p90, "predicted_ttft_p90_s": tt["ttft_p90_s"]}
            out.append({"model": spec["model"], "mnt": run.mnt, "cv": wl.cv, "dist": wl.dist, **ttft,
                        **_components(pr, res, strat, n),
                        "strategy": strat,
                        "measured_step_s": float(np.mean(meas_steps)), "predicted_step_s": float(np.mean(pred_real)),
                        "measured_tps": res.tps_per_gpu, "predicted_tps": pr.tps_per_gpu,
                        "step_error": float(np.mean(pred_real) / np.mean(meas_steps) - 1),
                        "tps_error": pr.tps_per_gpu / res.tps_per_gpu - 1})
    return out


def _components(pr: Prediction, res, strat: str, n: int) -> dict:
    """Per-rank means of the step-time components, predicted and measured (the bench JSON's
    compute_s / transfer_s / peer_wait_s): compute outside communication and waits, time
    moving bytes between GPUs (dep: all-to-all; dwdp: pulls, overlapped), time waiting for
    peers (dep: for the slowest rank; dwdp: prefetch wait the compute could not hide)."""
    pred = describe(strat).components(pr, n)
    load = pred.pop("expert_load_max_over_mean", None)
    out = {f"predicted_{k}": v for k, v in pred.items()}
    if load is not None:  # lockstep EP: the busiest rank's expert pairs over the mean, per layer
        out["predicted_expert_load_max_over_mean"] = load
        if res.expert_load_max_over_mean is not None:
            out["measured_expert_load_max_over_mean"] = res.expert_load_max_over_mean
    for k, attr in (("compute_s", "compute_s"), ("transfer_s", "transfer_s"), ("wait_s", "peer_wait_s")):
        vals = [getattr(r, attr) for r in res.ranks]
        if all(v is not None for v in vals) and vals:
            out[f"measured_{k}"] = float(np.mean(vals))
    return out


def predict_ttft(p: PlanInput, strategies=(DP, DEP, DWDP)) -> dict[str, dict]:
    """TTFT percentiles per strategy for the workload's arrivals (see :mod:`.ttft`)."""
    cm = p.cost_model()
    reqs = p.requests()
    return {s: simulate_ttft(cm, reqs, p.mnt, s, p.group_size, p.local_experts, p.skew, p.sliced,
                             balance_tail=p.balance_tail) for s in strategies}


def layer_jitter_from_runs(runs: list, num_layers: int | None = None) -> float:
    """Per-layer relative compute jitter across ranks from ``dwdp bench`` runs: dp steps of
    identical work (CV-0 workloads, full MNT steps at the same index on every rank) differ
    only by noise. Over n ranks the mean absolute deviation from the ranks' mean is
    sigma * sqrt(2 (n - 1) / (pi n)) of the step (for two ranks: E|a - b| = 2 sigma / sqrt(pi)),
    and a step's sigma is a layer's / sqrt(layers) if the layers' noise is independent."""
    devs, layers = [], []
    for run in runs:
        res = run.results.get(DP)
        if res is None or res.skipped or run.spec["workload"].get("cv", 0) != 0 or len(res.ranks) < 2:
            continue
        n = len(res.ranks)
        for k in range(min(len(r.step_seconds) for r in res.ranks)):
            if all(r.step_tokens[k] == run.mnt for r in res.ranks):
                x = np.array([r.step_seconds[k] for r in res.ranks])
                mad = float(np.mean(np.abs(x - x.mean())) / x.mean())
                devs.append(mad / np.sqrt(2 * (n - 1) / (np.pi * n)))
                layers.append(num_layers or run.spec.get("num_layers") or 1)
    if not devs:
        raise ValueError("no step of identical dp work on every rank (CV-0 dp runs on 2+ ranks needed)")
    return float(np.mean(devs) * np.sqrt(np.mean(layers)))
