"""``dwdp plan``: predict dwdp vs dep (and dp) from the model's shape, a hardware profile and
a workload, without a GPU; sweeps, the published numbers, and bench files to validate against."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import UserError, float_list, int_list, positive_float, positive_int
from ..strategy.registry import describe
from ..strategy.spec import BASELINE, DEP, DWDP, expert_format
from .common import _add_expert_dtype, _add_model_args, _console, _fixed_local_count, _profile


def add_parser(subparsers) -> None:
    plan = subparsers.add_parser("plan", help="predict dwdp vs dep (and dp) without a GPU; --sweep, --validate")
    _add_model_args(plan)
    plan.add_argument("--hardware", default="h200",
                      help="h100-sxm, h200, b200, gb200-nvl72 (datasheet) or a `dwdp calibrate` JSON (default h200)")
    _add_expert_dtype(plan, "bf16", runs=False)
    plan.add_argument("--kernels", default="ours", choices=["ours", "vendor"],
                      help="with a datasheet profile: this engine's kernel rates (default) or vendor libraries' "
                           "(cuBLAS, CUTLASS, cuDNN attention; both measured on H200)")
    plan.add_argument("--dense-dtype", default="bf16", choices=["bf16", "fp8"],
                      help="dense projections' precision (fp8: a vendor engine on an FP8 checkpoint)")
    plan.add_argument("--group-size", "-N", type=positive_int, default=4, help="DWDP / EP group size (default 4)")
    plan.add_argument("--local-experts", "-L", type=_fixed_local_count, default=None,
                      help="DWDP experts kept per rank (default: the smallest valid L)")
    plan.add_argument("--isl", type=positive_int, default=None,
                      help="mean input length (default: 8192, or the model's context if shorter)")
    plan.add_argument("--dist", default="uniform", choices=["fixed", "uniform", "normal", "lognormal"],
                      help="input length distribution")
    plan.add_argument("--ratio", type=float, default=0.8, help="uniform: lengths over [ratio*ISL, ISL]")
    plan.add_argument("--cv", type=float, default=0.0, help="normal/lognormal: coefficient of variation of the lengths")
    plan.add_argument("--assign", default="round_robin", choices=["round_robin", "least_loaded"],
                      help="how requests are spread over ranks")
    plan.add_argument("--requests-per-rank", type=positive_int, default=8, help="requests each rank prefills")
    plan.add_argument("--max-num-tokens", type=positive_int, default=16384, help="token budget per step (MNT)")
    plan.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of expert popularity")
    plan.add_argument("--balance-tail", action="store_true", help="the engine's --balance-tail scheduling")
    plan.add_argument("--paper", action="store_true",
                      help="the model against every published DWDP number it can express (a markdown table)")
    plan.add_argument("--frontier", default=None, metavar="U1,U2,...",
                      help="target tokens/s per user: the disaggregated-serving frontier (context dwdp vs dep)")
    plan.add_argument("--osl", type=positive_int, default=1024, help="with --frontier / --colocated: output tokens per request")
    plan.add_argument("--gen-gpus", type=positive_int, default=1, help="with --frontier: GPUs per decode (DEP) group")
    plan.add_argument("--colocated", default=None, metavar="C1,C2,...",
                      help="loadtest concurrencies: predict a one-GPU `dwdp serve` (prefill in the decode loop)")
    plan.add_argument("--colocated-requests", type=positive_int, default=64, help="with --colocated: requests per point")
    plan.add_argument("--max-batch", type=positive_int, default=64, help="with --colocated: the server's decode batch limit")
    plan.add_argument("--server-anatomy", default=None, metavar="FILE",
                      help="with --colocated: a benchmarks/serve_anatomy.py JSON: the server's overhead is fitted "
                           "from it and its measured points are printed beside")
    plan.add_argument("--rate", type=positive_float, default=None,
                      help="requests/s in total (Poisson): also predict TTFT percentiles per strategy")
    plan.add_argument("--sliced", action="store_true", help="model the sliced round-robin pull plan")
    plan.add_argument("--interference", type=float, default=None,
                      help="compute slowdown while pulls run (0.07 = 7%%); default: the profile's")
    plan.add_argument("--seed", type=int, default=0, help="seed of the simulated workload")
    plan.add_argument("--memory-gib", type=float, default=None, help="memory budget per GPU (default 92%% of it)")
    plan.add_argument("--sweep", default=None, help="isl|mnt|cv|skew[=v1,v2,...]: a table (and --png)")
    plan.add_argument("--png", default=None, help="with --sweep: write a plot here")
    plan.add_argument("--validate", nargs="+", default=None, help="dwdp bench JSON files: predicted vs measured")
    plan.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    plan.set_defaults(func=cmd_plan)


def _plan_input(args):
    from ..planner.hardware import with_kernels
    from ..planner.plan import PlanInput
    from ..presets import resolve_model
    from ..workload import WorkloadSpec

    cfg, _ = resolve_model(args.model, args.num_layers)
    if not cfg.name:  # a bare config.json: name it after its path (ModelConfig is frozen)
        cfg = dataclasses.replace(cfg, name=args.model)
    hw = with_kernels(_profile(args.hardware), args.kernels)
    if args.interference is not None:
        hw = dataclasses.replace(hw, interference=args.interference)
    limit = cfg.max_position_embeddings
    isl = args.isl if args.isl is not None else min(8192, limit)  # a short-context model plans at its context
    if isl > limit:
        raise UserError(f"--isl {isl} is longer than {cfg.name}'s context ({limit} tokens, "
                        f"max_position_embeddings); give --isl {limit} or less, or another --model")
    wl = WorkloadSpec(num_requests=args.requests_per_rank, isl=isl, dist=args.dist, ratio=args.ratio,
                      cv=args.cv, assign=args.assign, seed=args.seed, rate=args.rate)
    try:
        wl.validate(limit)
    except ValueError as e:
        raise UserError(f"the workload: {e}") from None
    from ..strategy.placement import Placement

    Placement.create(cfg.num_experts, args.group_size, args.local_experts)  # impossible N, L: said before any output
    expert_dtype = expert_format(args.expert_dtype, cfg.fp8_checkpoint, "bf16")  # the planner's model dtype
    if expert_dtype not in ("bf16", "fp8", "fp4"):
        raise UserError(f"--expert-dtype {args.expert_dtype}: the planner prices bf16, fp8 or fp4 experts")
    return PlanInput(cfg, hw, expert_dtype, args.group_size, args.local_experts, wl, args.max_num_tokens,
                     args.skew, args.sliced, args.balance_tail, args.dense_dtype)


def cmd_plan(args) -> int:
    from rich.table import Table

    from ..memory import FIT_HEADROOM
    from ..planner.plan import crossover, memory_per_gpu, predict_all, recommend, sweep, validate

    console = _console()
    if args.validate:
        from ..bench.schema import load_runs

        hw = _profile(args.hardware)
        rows = validate(load_runs(args.validate), hw)
        t = Table(title=f"predicted vs measured ({args.hardware})")
        for c in ("model", "MNT", "CV", "strategy", "measured step ms", "predicted", "error", "measured tok/s/GPU",
                  "predicted", "error", "TTFT p50 ms meas / pred", "p90 meas / pred"):
            t.add_column(c, justify="right")
        for r in rows:
            tt = [f"{1e3 * r[f'measured_ttft_{q}_s']:.0f} / {1e3 * r[f'predicted_ttft_{q}_s']:.0f}"
                  if f"measured_ttft_{q}_s" in r else "-" for q in ("p50", "p90")]
            t.add_row(r["model"], str(r["mnt"]), f"{r['cv']:g}", r["strategy"], f"{r['measured_step_s'] * 1e3:.1f}",
                      f"{r['predicted_step_s'] * 1e3:.1f}", f"{100 * r['step_error']:+.1f}%", f"{r['measured_tps']:,.0f}",
                      f"{r['predicted_tps']:,.0f}", f"{100 * r['tps_error']:+.1f}%", *tt)
        console.print(t)
        ct = Table(title="components per rank, seconds: measured / predicted (compute outside communication; "
                         "transfer: dep all-to-all, dwdp pulls; wait: dep for the slowest rank, dwdp exposed prefetch)")
        for c in ("model", "MNT", "CV", "strategy", "compute", "transfer", "wait"):
            ct.add_column(c, justify="right")
        for r in rows:
            cells = []
            for k in ("compute_s", "transfer_s", "wait_s"):
                m, pr_ = r.get(f"measured_{k}"), r[f"predicted_{k}"]
                cells.append("-" if m is None else f"{m:.2f} / {pr_:.2f}" + (
                    f" ({100 * (pr_ / m - 1):+.0f}%)" if m > 1e-3 else ""))
            ct.add_row(r["model"], str(r["mnt"]), f"{r['cv']:g}", r["strategy"], *cells)
        console.print(ct)
        errs = [abs(r["step_error"]) for r in rows]
        within = sum(e <= 0.15 for e in errs)
        console.print(f"step time within +-15%: {within} of {len(rows)} settings; mean |error| "
                      f"{100 * sum(errs) / len(errs):.1f}%")
        for strat in dict.fromkeys(r["strategy"] for r in rows):
            e = [abs(r["step_error"]) for r in rows if r["strategy"] == strat]
            console.print(f"  {strat}: {sum(x <= 0.15 for x in e)} of {len(e)} within +-15%, mean |error| "
                          f"{100 * sum(e) / len(e):.1f}%")
        for model in dict.fromkeys(r["model"] for r in rows):
            console.print(f"  {model}: {hw.fit_for(model)[1]}", highlight=False)
        loads = [(r["measured_expert_load_max_over_mean"], r["predicted_expert_load_max_over_mean"]) for r in rows
                 if r.get("measured_expert_load_max_over_mean") is not None]
        if loads:
            console.print("  dep expert load, busiest rank / mean per layer (measured / predicted): " + ", ".join(
                f"{m:.3f} / {p:.3f}" for m, p in loads), highlight=False)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.paper:
        from ..planner.paper import markdown, paper_points

        pts = paper_points()
        print(markdown(pts))
        errs = [abs(p.error) for p in pts]
        print(f"\n{sum(e <= 0.05 for e in errs)} of {len(pts)} within 5%, {sum(e <= 0.15 for e in errs)} within 15%")
        if args.out:
            with open(args.out, "w") as f:
                json.dump([dataclasses.asdict(p) | {"error": p.error} for p in pts], f, indent=1)
        return 0
    p = _plan_input(args)
    hw = p.hw
    # Every list parsed before anything is printed.
    if args.sweep:
        what, _, vals = args.sweep.partition("=")
        if what not in ("isl", "mnt", "cv", "skew"):
            raise UserError(f"--sweep {args.sweep!r}: sweep one of isl, mnt, cv, skew, e.g. --sweep mnt or "
                            "--sweep cv=0,0.2,0.4")
        values = float_list(vals, "--sweep " + what + "=", "0,0.2") if vals else {
            "isl": [1024, 2048, 4096, 8192, 16384, 32768], "mnt": [4096, 8192, 16384, 32768, 65536],
            "cv": [0, 0.1, 0.2, 0.3, 0.5], "skew": [0, 0.5, 1.0, 1.5]}[what]
    targets = float_list(args.frontier, "--frontier", "20,50,100") if args.frontier else None
    colocated = int_list(args.colocated, "--colocated", "1,8,32", minimum=1) if args.colocated else None
    console.print(f"[bold]{p.cfg.name}[/bold] ({p.cfg.num_layers} layers, E={p.cfg.num_experts}, top-{p.cfg.top_k}), "
                  f"experts {p.expert_dtype}; hardware {hw.name} ({hw.source}); "
                  f"{p.workload.describe().replace(str(p.workload.num_requests) + ' requests', str(p.workload.num_requests) + ' requests per rank')}, "
                  f"MNT {p.mnt}, skew {p.skew:g}", highlight=False)
    if args.sweep:
        rows = sweep(p, what, values)
        t = Table(title=f"sweep over {what}")
        for c in (what, "dep tok/s/GPU", "dwdp tok/s/GPU", "dwdp / dep", "dep sync share"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(f"{r[what]:g}", f"{r['dep']:,.0f}", f"{r['dwdp']:,.0f}", f"{r['ratio']:.2f}",
                      f"{100 * r['dep_sync_share']:.1f}%")
        console.print(t)
        if args.png:
            from ..planner.plots import sweep_png

            sweep_png(p, what, rows, args.png)
            console.print(f"wrote {args.png}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    pr = predict_all(p)
    base = pr[BASELINE].tps_per_gpu
    t = Table(title=f"predicted, group of N={p.group_size}")
    for c in ("strategy", "memory/GPU", "mean step ms", "tok/s/GPU", "vs dep", "where the time goes"):
        t.add_column(c, justify="left" if c in ("strategy", "where the time goes") else "right")
    budget = hw.memory_gib * FIT_HEADROOM
    for name, x in pr.items():
        mem = memory_per_gpu(p.cfg, name, p.group_size, p.local_experts, p.expert_dtype, p.mnt, p.dense_dtype) / 2**30
        steps = [s for rank in x.step_s for s in rank]
        note = describe(name).time_note(x, p.group_size)
        fits = "" if mem <= budget else " [red](does not fit)[/red]"
        t.add_row(name, f"{mem:.1f} GiB{fits}", f"{1e3 * sum(steps) / len(steps):.1f}", f"{x.tps_per_gpu:,.0f}",
                  f"{x.tps_per_gpu / base:.2f}", note)
    console.print(t)
    rows, first = crossover(p)
    console.print("dwdp / dep over ISL (this MNT): " + ", ".join(f"{isl // 1024}K {r:.2f}" for isl, _, _, r in rows)
                  + (f" -> dwdp wins from ISL {first}" if first else " -> dwdp does not win in this range"))
    rows1, first1 = crossover(p, batch_one=True)
    console.print("batch 1 (one prompt per step, MNT = ISL): " + ", ".join(
        f"{isl // 1024}K {r:.2f}" for isl, _, _, r in rows1) + (f" -> dwdp wins from ISL {first1}" if first1 else ""))
    if args.frontier:
        from ..planner.serving import frontier

        cm = p.cost_model()
        t = Table(title=f"disaggregated serving, ISL {p.workload.isl} / OSL {args.osl}, generation: {args.gen_gpus} "
                        f"GPU(s) per decode group (attention DP + EP), context: dwdp vs dep")
        for c in ("tok/s/user", "batch per gen GPU", "decode step ms", "gen tok/s/GPU", f"ctx GPUs per gen GPU {DWDP}",
                  DEP, f"output tok/s/GPU {DWDP}-context", f"{DEP}-context", f"{DWDP} / {DEP}"):
            t.add_column(c, justify="right")
        fr = {name: frontier(cm, pr[name].tps_per_gpu, p.workload.isl, args.osl, targets, args.gen_gpus)
              for name in (DWDP, DEP)}
        for a, b in zip(fr[DWDP], fr[DEP]):
            t.add_row(f"{a.tps_user:.0f}", str(a.batch), f"{a.step_s * 1e3:.1f}", f"{a.gen_tps_per_gpu:,.0f}",
                      f"{a.ctx_gpus_per_gen_gpu:.2f}", f"{b.ctx_gpus_per_gen_gpu:.2f}", f"{a.tps_per_gpu:,.0f}",
                      f"{b.tps_per_gpu:,.0f}", f"{a.tps_per_gpu / b.tps_per_gpu:.3f}")
        console.print(t)
        if len(fr[DWDP]) < len(targets):
            console.print(f"{len(targets) - len(fr[DWDP])} target(s) out of reach even at batch 1")
    if colocated:
        _print_colocated(console, p, args, colocated)
    if args.rate:
        from ..planner.plan import predict_ttft

        tt = predict_ttft(p)
        t = Table(title=f"TTFT at {args.rate:g} requests/s in total (prefill only; Poisson arrivals)")
        for c in ("strategy", "TTFT p50 ms", "p90 ms", "p99 ms", "mean ms"):
            t.add_column(c, justify="right")
        for name, r in tt.items():
            t.add_row(name, *(f"{1e3 * r[k]:.0f}" for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_mean_s")))
        console.print(t)
    cands, best = recommend(p, args.memory_gib)
    if best:
        console.print(f"recommended under {args.memory_gib or budget:.0f} GiB/GPU: N={best['N']} L={best['L']} "
                      f"({best['memory_gib']:.1f} GiB, {best['tps_per_gpu']:,.0f} tok/s/GPU predicted)")
    else:
        console.print("no DWDP group size fits the memory budget")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({name: {"tps_per_gpu": x.tps_per_gpu, "busy_s": x.busy_s, "makespan_s": x.makespan_s}
                       for name, x in pr.items()} | {"crossover": rows, "candidates": cands}, f, indent=1, default=float)
    return 0


def _print_colocated(console, p, args, concurrencies: list[int]) -> None:
    """`dwdp plan --colocated C1,C2,..`: a one-GPU server (prefill in the decode loop) under a
    closed-loop loadtest at each concurrency, with the server's overhead fitted from a
    `benchmarks/serve_anatomy.py` file when given, its measured points beside."""
    from rich.table import Table

    from ..planner.serving import fit_server_overhead, simulate_colocated

    cm = p.cost_model()
    isl, osl = p.workload.isl, args.osl
    overhead, measured = (0.0, 0.0, 0.0), {}
    if args.server_anatomy:
        try:
            data = json.loads(Path(args.server_anatomy).read_text())
            rows = data["rows"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"--server-anatomy {args.server_anatomy}: not a benchmarks/serve_anatomy.py JSON ({e}); "
                            "give the file that script wrote") from None
        if (data.get("isl"), data.get("osl")) != (isl, osl):  # compare like with like: the file's workload
            console.print(f"--server-anatomy: using the file's ISL {data.get('isl')} / OSL {data.get('osl')} "
                          f"(not {isl} / {osl})")
            isl, osl = data.get("isl") or isl, data.get("osl") or osl
        overhead = fit_server_overhead(cm, isl, osl, rows, p.mnt)
        measured = {r["max_concurrency"]: r["loadtest"] for r in rows}
    t = Table(title=f"one-GPU server, prefill in the decode loop, ISL {isl} / OSL {osl}, max batch {args.max_batch}, "
                    f"MNT {p.mnt}; server overhead {overhead[0] * 1e3:.2f} ms + {overhead[1] * 1e3:.3f} ms/seq per decode "
                    f"step, {overhead[2] * 1e3:.1f} ms per prefill step")
    for c in ("concurrency", "tok/s/GPU", "tok/s/user", "TTFT p50 ms", "TTFT p90 ms"):
        t.add_column(c, justify="right")
    for c in concurrencies:
        r = simulate_colocated(cm, isl, osl, args.colocated_requests, c, args.max_batch, p.mnt, overhead)
        m = measured.get(c)
        def pair(pred, meas, f):
            show = (lambda v: "-" if v is None else f(v))
            return show(pred) if meas is None else f"{show(pred)} / {show(meas)}"

        t.add_row(str(c), pair(r["tps_per_gpu"], m and m["tps_per_gpu"], lambda v: f"{v:,.0f}"),
                  pair(r["tps_per_user"], m and m["tps_per_user"], lambda v: f"{v:.0f}"),
                  pair(r["ttft_p50_s"], m and m["ttft_s"]["p50"], lambda v: f"{v * 1e3:.0f}"),
                  pair(r["ttft_p90_s"], m and m["ttft_s"]["p90"], lambda v: f"{v * 1e3:.0f}"))
    console.print(t)
    if measured:
        console.print("(predicted / measured)")
