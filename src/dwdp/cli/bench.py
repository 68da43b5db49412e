"""``dwdp bench``: dp, dep and dwdp on one seeded workload, each in its own local processes."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from ..config import DTYPES
from ..errors import UserError, float_list, int_list, positive_float, positive_int
from ..strategy.registry import STRATEGIES
from ..strategy.spec import DEPConfig, DWDPConfig, options_from
from .common import (_add_dense_dtype, _add_expert_dtype, _add_model_args, _add_options, _add_removed_flags,
                     _console, _device, _model_config, _plan_or_explain)


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="compare dp / dep / dwdp on one seeded workload, each in its own local "
                                                "processes (default: tiny model, 2 CPU processes)")
    _add_model_args(bench)
    bench.add_argument("--device", type=_device, default="cpu", help="cpu (processes) or cuda (one GPU per rank)")
    bench.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="default: float32 on cpu, bfloat16 on cuda")
    bench.add_argument("--world-size", "-W", type=positive_int, default=2, help="ranks (GPUs or CPU processes), default 2")
    bench.add_argument("--group-size", "-N", type=positive_int, default=None,
                       help="DEP / DWDP group size (default: the whole world)")
    bench.add_argument("--strategies", default="dp,dep,dwdp", help="comma-separated subset of dp,dep,dwdp")
    w = bench.add_argument_group("workload (seeded: every strategy sees the same requests)")
    w.add_argument("--num-requests", type=positive_int, default=8, help="requests in total (default 8)")
    w.add_argument("--isl", default="96",
                   help="mean input length (uniform: the maximum); comma list = sweep, shorter ISLs with proportionally "
                        "more requests (plot: dwdp report); default 96")
    w.add_argument("--dist", default="uniform", choices=["fixed", "uniform", "normal", "lognormal", "trace"],
                   help="input length distribution (default uniform)")
    w.add_argument("--ratio", type=float, default=0.5, help="uniform: lengths over [ratio*ISL, ISL] (default 0.5)")
    w.add_argument("--cv", default="0", help="normal/lognormal coefficient of variation; comma list = sweep")
    w.add_argument("--trace", default=None, help="JSONL trace: {\"input_len\": n, \"arrival\": s} per line")
    w.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests/s (default: all at once)")
    w.add_argument("--assign", default="round_robin", choices=["round_robin", "least_loaded"],
                   help="how requests are spread over ranks")
    w.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of a router bias (hot experts); 0: none")
    w.add_argument("--balance-tail", action="store_true",
                   help="dp/dwdp ranks: once every request has arrived, split the rest into equal steps (no short "
                        "last step whose pulls cannot hide); lockstep dep keeps the plain scheduler")
    w.add_argument("--seed", type=int, default=0, help="workload and random-weight seed")
    bench.add_argument("--max-num-tokens", default="256", help="MNT per step; comma list = sweep (default 256)")
    _add_options(bench, DWDPConfig, DEPConfig)
    _add_removed_flags(bench, "--pull-pacing", "--short-steps", "--ship-max-tokens")
    bench.add_argument("--hold-ms", type=float, default=3.0,
                       help="DWDP with timed arrivals (--rate, traces): hold a step below the measured break-even "
                            "size up to this long for more requests (default 3; 0: never)")
    _add_expert_dtype(bench, "auto")
    _add_dense_dtype(bench, "auto")
    _add_removed_flags(bench, "--dep-transport", "--dep-overlap")
    bench.add_argument("--peer-timeout", type=positive_float, default=120.0, help="seconds before a silent peer fails the run")
    bench.add_argument("--ceilings", action="store_true", help="GPU: also measure all-to-all bandwidth")
    bench.add_argument("--diagnostic", default=None, choices=["trace", "skip-pulls"],
                       help="trace: host timeline of DWDP slot acquires; skip-pulls: DWDP with no pulls at all "
                            "(wrong outputs: the communication-free limit of the schedule). Marked in the JSON")
    bench.add_argument("--timeout", type=positive_float, default=1800.0, help="limit per strategy run, seconds")
    bench.add_argument("--repeat", type=int, default=1,
                       help="run every setting this many times in the same processes (warm; "
                            "`dwdp report --reps` gives min / median / max)")
    bench.add_argument("--out", default="bench.json", help="JSON results file (default bench.json)")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from ..bench.runner import comparison_table, sweep, write_json
    from ..bench.worker import BenchSpec
    from ..ceilings import machine_info
    from ..parallel.launch import SpawnError
    from ..workload import WorkloadSpec, generate

    console = _console()
    strategies = [s.strip() for s in args.strategies.split(",")]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise UserError(f"--strategies {args.strategies!r}: unknown strategy {', '.join(map(repr, bad))}; "
                        f"choose from {', '.join(STRATEGIES)}")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
        if torch.cuda.device_count() < args.world_size:
            raise UserError(f"--world-size {args.world_size} needs {args.world_size} GPUs, "
                            f"{torch.cuda.device_count()} visible; give -W {torch.cuda.device_count()} or less")
    if args.group_size is not None and args.world_size % args.group_size:
        raise UserError(f"--world-size {args.world_size} is not a multiple of --group-size {args.group_size}: "
                        "give a multiple (W/N groups of N ranks)")
    if args.repeat < 1:
        raise UserError(f"--repeat {args.repeat}: give at least 1 (the number of runs of each setting)")
    cfg = _model_config(args.model, args.num_layers)
    cvs = float_list(args.cv, "--cv", "0,0.2")
    mnts = int_list(args.max_num_tokens, "--max-num-tokens", "256,1024", minimum=1)
    isls = int_list(args.isl, "--isl", "8192 or --isl 1024,2048", minimum=1)
    limit = cfg.max_position_embeddings
    if args.dist != "trace" and max(isls) > limit:
        raise UserError(f"--isl {max(isls)} is longer than the model's context ({limit} tokens, "
                        f"max_position_embeddings of {args.model}); give --isl {limit} or less")
    workload = WorkloadSpec(num_requests=args.num_requests, isl=isls[0], dist=args.dist, ratio=args.ratio,
                            cv=cvs[0], trace=args.trace, rate=args.rate, assign=args.assign, seed=args.seed)
    for isl in isls:
        for cv in cvs:
            try:
                wl = dataclasses.replace(workload, isl=isl, cv=cv)
                wl.validate(limit)
                if wl.dist == "trace":  # read here, not in every rank
                    generate(wl, cfg.vocab_size, limit)
            except ValueError as e:
                raise UserError(f"the workload: {e}") from None
    spec = BenchSpec(model=args.model, num_layers=args.num_layers, dtype=args.dtype, device=device,
                     world_size=args.world_size, group_size=args.group_size, strategies=strategies,
                     workload=workload, max_num_tokens=mnts[0], skew=args.skew, balance_tail=args.balance_tail,
                     dwdp=options_from(DWDPConfig, args), dep=options_from(DEPConfig, args), hold_ms=args.hold_ms,
                     expert_dtype=args.expert_dtype, dense_dtype=args.dense_dtype,
                     seed=args.seed,
                     peer_timeout_s=args.peer_timeout,
                     ceilings=args.ceilings, diagnostic=args.diagnostic, progress=sys.stderr.isatty())
    # Every strategy's group planned from the config before any process starts: -W 13 on a
    # 12-expert model is one line here, not a dp run followed by a traceback per rank.
    flag = "-N/--group-size" if args.group_size is not None else "-W/--world-size (the group size)"
    for strategy in strategies:
        _plan_or_explain(spec.rank_spec(strategy, max(mnts)), flag)
    machine, saved = machine_info(), []

    def save(runs):  # after every strategy: a run cut short keeps what it finished
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            write_json(args.out, [r for r in runs if r.results], machine)
            saved.append(True)

    try:
        runs = sweep(spec, cvs if len(cvs) > 1 else None, mnts if len(mnts) > 1 else None, args.timeout,
                     log=lambda m: console.print(m, highlight=False, markup=False),
                     isls=isls if len(isls) > 1 else None, repeat=args.repeat, on_strategy=save)
    except SpawnError as e:
        console.print(f"[red]error:[/red] a rank failed:\n{e}", highlight=False)
        if saved:
            console.print(f"{args.out} holds the strategies that finished before it")
        return 1
    for run in runs:
        console.print(comparison_table(run))
    if args.out:
        save(runs)
        console.print(f"wrote {args.out}")
    return 0
