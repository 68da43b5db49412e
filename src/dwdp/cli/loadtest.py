"""``dwdp loadtest``: replay a workload against a ``dwdp serve``; latency percentiles and throughput."""

from __future__ import annotations

import json
import os

from ..errors import UserError, int_list, positive_float, positive_int
from .common import _console


def add_parser(subparsers) -> None:
    lt = subparsers.add_parser("loadtest", help="replay a workload against a dwdp serve on this machine: TTFT / TPOT / "
                                                "ITL / E2E percentiles and throughput")
    lt.add_argument("--url", default="http://127.0.0.1:8000",
                    help="the server's address (an OpenAI base URL ending in /v1 works too)")
    lt.add_argument("--num-requests", type=positive_int, default=32, help="requests in total")
    lt.add_argument("--isl", type=positive_int, default=64, help="mean input length, tokens (uniform: the maximum)")
    lt.add_argument("--dist", default="uniform", choices=["fixed", "uniform", "normal", "lognormal"],
                    help="input length distribution")
    lt.add_argument("--ratio", type=float, default=0.5, help="uniform: lengths over [ratio*ISL, ISL]")
    lt.add_argument("--cv", type=float, default=0.0, help="normal/lognormal: coefficient of variation of the lengths")
    lt.add_argument("--rate", type=positive_float, default=None, help="requests/s (Poisson); default all at once")
    lt.add_argument("--max-tokens", type=positive_int, default=16, help="output tokens per request (OSL)")
    lt.add_argument("--max-concurrency", type=positive_int, default=64, help="requests in flight at most")
    lt.add_argument("--gpus", type=positive_int, default=1, help="GPUs behind the server, for tokens/s per GPU")
    lt.add_argument("--api-key", default=None, help="the server's bearer key (default: $DWDP_API_KEY)")
    lt.add_argument("--seed", type=int, default=0, help="seed of the request lengths and token ids")
    lt.add_argument("--out", default=None, help="JSON summary")
    lt.add_argument("--sweep-concurrency", default=None,
                    help="comma-separated concurrency caps, e.g. 1,4,16,64: one load test each, written as one "
                         "frontier file (plot it with dwdp report)")
    lt.add_argument("--label", default="server", help="the frontier's name in plots (e.g. dwdp-context)")
    lt.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args) -> int:
    from ..serve.loadtest import percentile_table, run_loadtest
    from ..workload import WorkloadSpec

    api_key = args.api_key or os.environ.get("DWDP_API_KEY")
    wl = WorkloadSpec(num_requests=args.num_requests, isl=args.isl, dist=args.dist, ratio=args.ratio, cv=args.cv,
                      rate=args.rate, seed=args.seed)
    try:
        wl.validate(10**9)  # the server's context is checked once it answers
    except ValueError as e:
        raise UserError(f"the workload: {e}") from None
    console = _console()
    if args.sweep_concurrency:
        from ..ceilings import machine_info
        from ..serve.frontier import sweep

        caps = int_list(args.sweep_concurrency, "--sweep-concurrency", "1,4,16,64", minimum=1)
        res = sweep(lambda cap: run_loadtest(args.url, wl, args.max_tokens, args.gpus, cap, api_key), caps,
                    args.label, machine_info())
        failed = sum(p["failed"] for p in res["points"])
        summary = res
    else:
        summary = run_loadtest(args.url, wl, args.max_tokens, args.gpus, args.max_concurrency, api_key,
                               log=lambda m: None)
        console.print(percentile_table(summary))
        failed = summary["failed"]
        if failed:
            console.print(f"{failed} request(s) failed: " + "; ".join(summary["errors"]), highlight=False,
                          markup=False)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.out}")
    return 0 if failed == 0 else 1
