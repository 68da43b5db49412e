"""The ``dwdp bench`` JSON file, typed: what the bench writes and what ``dwdp report``
and ``dwdp plan --validate`` read.

A file is ``{"machine": {...}, "runs": [BenchRun...]}``; a run is one workload and MNT
with a :class:`StrategyResult` per strategy, each holding a :class:`RankSummary` per
rank. Fields a strategy does not have (DEP's time at collectives, DWDP's exposed wait)
are ``None``. Reading checks the required fields and names the first one missing, so a
file from elsewhere fails with a clear error instead of a ``KeyError`` deep in a plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SchemaError(ValueError):
    pass


def _build(cls, data: dict, where: str):
    """``cls(**data)`` for the fields it declares; nested dataclasses built recursively;
    unknown keys ignored (newer writers), missing required ones named."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{where}: missing field {f.name!r}")
            continue
        kw[f.name] = data[f.name]
    return cls(**kw)


@dataclass
class TTFT:
    mean: float
    p50: float
    p90: float
    p99: float


@dataclass
class RankSummary:
    rank: int
    tokens: int
    requests: int
    steps: int  # steps with tokens
    dummy_steps: int  # lockstep steps run only so a peer's collectives line up
    busy_s: float  # time in steps
    makespan_s: float
    idle_s: float  # until the last rank of the run finished
    peak_memory_bytes: int
    step_tokens: list[int]
    step_seconds: list[float]
    memory: dict | None = None  # the runtime's memory report (bytes by part)
    # Every strategy: GPU-busy time outside collectives and waits, time moving bytes between
    # GPUs (DWDP: pulls on the copy engine, overlapped with compute), time waiting for peers.
    compute_s: float | None = None
    transfer_s: float | None = None
    peer_wait_s: float | None = None
    host_syncs: int | None = None  # dep: host synchronisations inside steps
    # dep
    collective_s: float | None = None  # inside all-to-alls, waiting for the slowest peer included
    step_collective_s: list[float] | None = None
    a2a_sent_bytes: int | None = None
    a2a_ceiling_gbps: float | None = None  # NCCL all-to-all measured in the same run (--ceilings)
    expert_pairs: list[list[int]] | None = None  # per step, per MoE layer: (token, expert) pairs computed here
    # dwdp
    exposed_wait_s: float | None = None  # prefetch wait the compute could not hide
    step_exposed_wait_s: list[float] | None = None
    pulled_bytes: int | None = None
    pull_gbps: float | None = None  # pulled bytes over copy-engine seconds
    break_even_tokens: int | None = None  # measured: the step size whose compute hides one layer's pull
    held_s: float | None = None  # time short steps were held back for more work (--hold-ms)
    trace: list | None = None  # --diagnostic trace: (event, seconds) host timeline

    @property
    def wait_s(self) -> float:
        """Time the rank's GPU spent on communication it could not overlap."""
        return (self.collective_s or 0.0) + (self.exposed_wait_s or 0.0)


@dataclass
class StrategyResult:
    skipped: str | None = None  # why the strategy did not run (e.g. it does not fit)
    tokens: int = 0
    requests: int = 0
    makespan_s: float = 0.0
    tps_per_gpu: float = 0.0  # input tokens / makespan / GPUs
    tps_per_busy_gpu: float = 0.0  # input tokens / GPU-seconds in steps
    ttft_s: TTFT | None = None
    peak_memory_bytes: int = 0
    ranks: list[RankSummary] = field(default_factory=list)
    collective_share: float | None = None
    exposed_wait_share: float | None = None
    pull_gbps: float | None = None
    # dep: mean over lockstep layers of (most pairs on one rank) / (mean pairs per rank): how
    # much longer the busiest rank's experts take than a balanced share.
    expert_load_max_over_mean: float | None = None
    diagnostic: str | None = None  # a diagnostic run (e.g. skip-pulls): not a real result

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "StrategyResult":
        r = _build(cls, d, where)
        if r.skipped is None:
            for req in ("tokens", "makespan_s", "tps_per_gpu", "ttft_s", "ranks"):
                if req not in d:
                    raise SchemaError(f"{where}: missing field {req!r}")
        r.ttft_s = _build(TTFT, r.ttft_s, f"{where}.ttft_s") if r.ttft_s is not None else None
        r.ranks = [_build(RankSummary, x, f"{where}.ranks[{i}]") for i, x in enumerate(r.ranks)]
        return r


@dataclass
class BenchRun:
    spec: dict  # BenchSpec.to_dict(): model, world_size, max_num_tokens, workload, ...
    results: dict[str, StrategyResult]
    machine: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)  # strategy -> the ranks' own reports (not written)

    @property
    def mnt(self) -> int:
        return self.spec["max_num_tokens"]

    @property
    def workload(self) -> dict:
        return self.spec["workload"]

    def to_dict(self) -> dict:
        return {"spec": self.spec, "results": {k: dataclasses.asdict(v) for k, v in self.results.items()}}

    @classmethod
    def from_dict(cls, d: dict, where: str, machine: dict | None = None) -> "BenchRun":
        run = _build(cls, d, where)
        for key in ("model", "world_size", "max_num_tokens", "workload"):
            if key not in run.spec:
                raise SchemaError(f"{where}.spec: missing field {key!r}")
        run.results = {k: StrategyResult.from_dict(v, f"{where}.results.{k}") for k, v in run.results.items()}
        run.machine = machine or {}
        return run


def _clean(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None  # JSON has no NaN
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def write_runs(path: str, runs: list[BenchRun], machine: dict) -> None:
    with open(path, "w") as f:
        json.dump(_clean({"machine": machine, "runs": [r.to_dict() for r in runs]}), f, indent=1)


def load_runs(paths: list[str]) -> list[BenchRun]:
    runs = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SchemaError(f"{p}: not a readable dwdp bench JSON file ({e})")
        if not isinstance(data, dict) or "runs" not in data:
            raise SchemaError(f"{p}: no 'runs' key: write it with `dwdp bench --out`")
        runs += [BenchRun.from_dict(r, f"{p}: runs[{i}]", data.get("machine", {})) for i, r in enumerate(data["runs"])]
    if not runs:
        raise SchemaError("no runs in the given files")
    return runs
