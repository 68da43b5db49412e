"""``dwdp report``: PNG plots from ``dwdp bench`` JSON files.

* throughput.png: tokens/s per GPU against the variable the bench swept (ISL, MNT, CV,
  input ratio or router skew), one line per strategy (and per value of any other swept
  variable); a bench of one setting gives one bar per strategy. Repetitions of a setting
  (several files) show the median, with min and max as error bars;
* breakdown.png: per-rank time of each strategy at one named setting, split into compute,
  transfer on the step's critical path (dep's all-to-all), waiting (for the slowest peer,
  or dwdp's exposed prefetch) and idle until the last rank ends;
* ttft.png: TTFT percentiles per strategy at that setting;
* isl_sweep.png (runs at several ISLs): tokens/s per GPU against the ISL per strategy and
  MNT, with ``dwdp plan``'s prediction for each run drawn dashed beside it when a hardware
  profile is given.

Every title names the device (the GPU model, or CPU). Colours mean one thing each: a
strategy's colour (dp grey, dep red, dwdp blue) in throughput and TTFT plots, and
:data:`PART_COLORS` for the parts of a rank's time.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..strategy.registry import STRATEGIES
from ..strategy.spec import BASELINE
from .schema import BenchRun, load_runs

# Parts of a rank's time; none shares a colour with a strategy.
PART_COLORS = {"compute": "tab:green", "transfer": "tab:purple", "wait": "tab:orange", "idle": "lightgray"}

# What a bench can sweep: (key, axis label, value of a run).
SWEEPABLE = (
    ("isl", "input sequence length (mean)", lambda r: r.workload["isl"]),
    ("mnt", "max tokens per step (MNT)", lambda r: r.mnt),
    ("cv", "ISL coefficient of variation", lambda r: r.workload["cv"]),
    ("ratio", "input ratio (uniform lengths over [ratio x ISL, ISL])", lambda r: r.workload["ratio"]),
    ("skew", "router skew (Zipf exponent)", lambda r: r.spec.get("skew", 0.0)),
)


def _spread(run: BenchRun) -> tuple[str, float]:
    w = run.workload
    if w["dist"] == "uniform":
        return "input ratio (uniform lengths)", w["ratio"]
    return "ISL coefficient of variation", w["cv"]


def device_name(run: BenchRun) -> str:
    """The GPU model for a GPU run, "CPU" for a CPU one (a CPU run on a GPU machine too)."""
    gpus = run.machine.get("gpus") or []
    if run.spec.get("device", "cuda" if gpus else "cpu") == "cpu" or not gpus:
        return "CPU"
    return gpus[0]


def describe_setting(run: BenchRun) -> str:
    """The workload and step budget of one run, in words."""
    w, sp = run.workload, run.spec
    shape = {"fixed": f"ISL {w['isl']}", "uniform": f"ISL U[{w['ratio']:g}x, 1x] of {w['isl']}",
             "normal": f"ISL normal {w['isl']} CV {w['cv']:g}", "lognormal": f"ISL lognormal {w['isl']} CV {w['cv']:g}",
             "trace": "trace"}.get(w["dist"], f"{w['dist']} ISL {w['isl']}")
    skew = f", skew {sp['skew']:g}" if sp.get("skew") else ""
    return f"{w['num_requests']} requests, {shape}, MNT {run.mnt}{skew}"


def tps_label(run: BenchRun) -> str:
    return "input tokens / s / GPU" if device_name(run) != "CPU" else "input tokens / s / rank (CPU process)"


def _title(runs: list[BenchRun]) -> str:
    spec = runs[0].spec
    return (f"{spec['model']} ({spec.get('num_layers') or 'all'} layers), {spec['world_size']} ranks on "
            f"{device_name(runs[0])}")


def swept(runs: list[BenchRun]) -> list[tuple[str, str, callable]]:
    """The sweepable variables whose value differs between runs, in :data:`SWEEPABLE` order."""
    return [v for v in SWEEPABLE if len({v[2](r) for r in runs}) > 1]


def throughput_series(runs: list[BenchRun]):
    """(x variable or None, {(strategy, other swept values): {x: [tok/s/GPU of each repetition]}})."""
    var = swept(runs)
    x, others = (var[0], var[1:]) if var else (None, [])
    series: dict[tuple, dict] = {}
    for r in runs:
        for strat, res in r.results.items():
            if res.skipped or res.diagnostic:
                continue
            key = (strat, tuple((k, f(r)) for k, _, f in others))
            series.setdefault(key, {}).setdefault(x[2](r) if x else None, []).append(res.tps_per_gpu)
    return x, series


def isl_sweep_series(runs: list[BenchRun], hw=None) -> dict[tuple[str, int, float], dict[str, list]]:
    """Per (strategy, MNT, CV): the ISLs, measured tok/s/GPU and (with a hardware profile)
    the planner's prediction for the same run, sorted by ISL; repetitions of a setting
    (several files) give the median."""
    preds: dict[tuple[int, str], float] = {}
    if hw is not None:
        from ..planner.plan import validate

        for i, run in enumerate(runs):
            for row in validate([run], hw):
                preds[(i, row["strategy"])] = row["predicted_tps"]
    points: dict[tuple[str, int, float], dict[int, list]] = {}
    for i, r in enumerate(runs):
        for strat, res in r.results.items():
            if res.skipped or res.diagnostic:
                continue
            key = (strat, r.mnt, r.workload["cv"])
            points.setdefault(key, {}).setdefault(r.workload["isl"], []).append((res.tps_per_gpu, preds.get((i, strat))))
    series = {}
    for key, by_isl in points.items():
        isls = sorted(by_isl)
        pred = [[p for _, p in by_isl[i] if p is not None] for i in isls]
        series[key] = {"isl": isls, "measured": [statistics.median(m for m, _ in by_isl[i]) for i in isls],
                       "predicted": [statistics.median(p) if p else None for p in pred]}
    return series


def _isl_sweep_plot(runs: list[BenchRun], out: Path, hw, colors) -> str:
    import matplotlib.pyplot as plt

    series = isl_sweep_series(runs, hw)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = ["o", "s", "^", "D"]
    mnts = sorted({m for _, m, _ in series})
    several_cvs = len({cv for _, _, cv in series}) > 1
    for (strat, mnt, cv), d in sorted(series.items()):
        c, mk = colors.get(strat), styles[mnts.index(mnt) % len(styles)]
        label = f"{strat} MNT {mnt}" + (f" CV {cv:g}" if several_cvs else "")
        ax.plot(d["isl"], d["measured"], marker=mk, color=c, label=label)
        if any(v is not None for v in d["predicted"]):
            ax.plot(d["isl"], [v if v is not None else float("nan") for v in d["predicted"]], linestyle="--",
                    marker=mk, markerfacecolor="none", color=c, alpha=0.7, label=f"{label}, predicted")
    ax.set_xscale("log", base=2)
    isls = sorted({i for d in series.values() for i in d["isl"]})
    ax.set_xticks(isls, [f"{i // 1024}K" if i >= 1024 and i % 1024 == 0 else str(i) for i in isls])
    ax.set_xlabel("input sequence length (mean)")
    ax.set_ylabel(tps_label(runs[0]))
    ax.set_ylim(bottom=0)
    ax.set_title(_title(runs) + (f"; dashed: dwdp plan ({hw.name})" if hw is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = out / "isl_sweep.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return str(p)


def _spread_bars(values: list[float]):
    med = statistics.median(values)
    return med, (med - min(values), max(values) - med)


def _throughput_plot(runs: list[BenchRun], out: Path, colors) -> str:
    import matplotlib.pyplot as plt

    x, series = throughput_series(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    reps = max(len(v) for d in series.values() for v in d.values())
    if x is None:  # one setting: a bar per strategy
        names = [k[0] for k in series]  # the file's order: as the bench ran them
        meds = [_spread_bars(series[k][None]) for k in series]
        bars = ax.bar(names, [m for m, _ in meds], color=[colors.get(n, "tab:gray") for n in names],
                      yerr=[[e[0] for _, e in meds], [e[1] for _, e in meds]] if reps > 1 else None, capsize=4)
        ax.bar_label(bars, labels=[f"{m:,.0f}" for m, _ in meds], padding=3, fontsize=8)
        ax.set_xlabel(f"strategy ({describe_setting(runs[0])})")
    else:
        styles = ["-", "--", ":", "-."]
        markers = ["o", "s", "^", "D"]
        other_keys = sorted({k[1] for k in series})
        order = list(STRATEGIES)
        for (strat, other), d in sorted(series.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order
                                                                        else len(order), kv[0])):
            xs = sorted(d)
            meds = [_spread_bars(d[v]) for v in xs]
            i = other_keys.index(other)
            label = strat + "".join(f", {k.upper() if k in ('isl', 'mnt', 'cv') else k} {v:g}" for k, v in other)
            ax.errorbar(xs, [m for m, _ in meds], yerr=[[e[0] for _, e in meds], [e[1] for _, e in meds]]
                        if reps > 1 else None, marker=markers[i % len(markers)], linestyle=styles[i % len(styles)],
                        color=colors.get(strat), label=label, capsize=3)
        if x[0] in ("isl", "mnt"):
            ax.set_xscale("log", base=2)
            xs = sorted({v for d in series.values() for v in d})
            ax.set_xticks(xs, [f"{int(v)}" for v in xs])
        ax.set_xlabel(x[1])
        ax.legend(fontsize=8)
    ax.set_ylabel(tps_label(runs[0]) + (" (median; bars: min-max)" if reps > 1 else ""))
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)
    ax.set_title(_title(runs), fontsize=10)
    ax.grid(alpha=0.3, axis="y" if x is None else "both")
    fig.tight_layout()
    p = out / "throughput.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return str(p)


def time_parts(rank) -> dict[str, float]:
    """A rank's makespan split into compute (the rest of its steps: kernels and host work),
    transfer on the critical path, waiting and idle. dep's time in collectives is its
    all-to-all transfer plus waiting for the slowest peer; dwdp's pulls run beside the compute
    (only their exposed wait stalls it), so they are no part of its time."""
    if rank.collective_s is not None:
        transfer = rank.transfer_s or 0.0
        wait = rank.peer_wait_s if rank.peer_wait_s is not None else rank.collective_s - transfer
    else:
        transfer = 0.0
        wait = rank.exposed_wait_s if rank.exposed_wait_s is not None else (rank.peer_wait_s or 0.0)
    return {"compute": max(0.0, rank.busy_s - transfer - wait), "transfer": transfer, "wait": wait,
            "idle": rank.idle_s}


PART_LABELS = {"compute": "compute", "transfer": "transfer in the step (all-to-all)",
               "wait": "waiting (slowest peer, exposed prefetch)", "idle": "idle until the last rank ends"}


def render(paths: list[str], out_dir: str, hw=None) -> list[str]:
    """The PNGs above; ``hw`` (a :class:`~dwdp.planner.hardware.HardwareProfile`) adds the
    planner's predictions to the ISL sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {name: s.color for name, s in STRATEGIES.items()}
    if len({r.workload["isl"] for r in runs}) > 1:
        written.append(_isl_sweep_plot(runs, out, hw, colors))
    written.append(_throughput_plot(runs, out, colors))

    # Per-rank breakdown at one setting, named in the title: the largest value of the swept
    # variable (the most spread when CV or skew is swept).
    var = swept(runs)
    run = max(runs, key=lambda r: tuple(f(r) for _, _, f in var)) if var else runs[0]
    strategies = [k for k, v in run.results.items() if not v.skipped]
    setting = describe_setting(run)
    if strategies:
        fig, axes = plt.subplots(1, len(strategies), figsize=(3.6 * len(strategies) + 1.5, 4.2), sharey=True,
                                 squeeze=False)
        drawn = {}
        for ax, strat in zip(axes[0], strategies):
            ranks = run.results[strat].ranks
            xs = [str(rr.rank) for rr in ranks]
            parts = [time_parts(rr) for rr in ranks]
            bottom = [0.0] * len(ranks)
            for part, color in PART_COLORS.items():
                vals = [p[part] * 1e3 for p in parts]
                if any(v > 0 for v in vals):
                    drawn[part] = ax.bar(xs, vals, bottom=bottom, color=color, label=PART_LABELS[part])
                    bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title(strat, color=colors.get(strat, "black"))
            ax.set_xlabel("rank")
        axes[0][0].set_ylabel("ms")
        fig.legend([drawn[k] for k in PART_COLORS if k in drawn], [PART_LABELS[k] for k in PART_COLORS if k in drawn],
                   loc="lower center", ncol=len(drawn), fontsize=8, frameon=False)
        fig.suptitle(f"per-rank time: {_title([run])}\n{setting}", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        p = out / "breakdown.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(str(p))

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        qs = ("p50", "p90", "p99")
        width = 0.8 / len(strategies)
        for i, strat in enumerate(strategies):
            t = run.results[strat].ttft_s
            ax.bar([j + i * width for j in range(len(qs))], [getattr(t, q) * 1e3 for q in qs], width, label=strat,
                   color=colors.get(strat))
        ax.set_xticks([j + width * (len(strategies) - 1) / 2 for j in range(len(qs))], qs)
        ax.set_ylabel("TTFT ms")
        ax.set_title(f"TTFT: {_title([run])}\n{setting}", fontsize=10)
        ax.legend()
        fig.tight_layout()
        p = out / "ttft.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(str(p))
    return written


def markdown(paths: list[str]) -> str:
    """One markdown table per file: a row per (MNT, spread, strategy), ratios to dep."""
    lines = []
    for p in paths:
        runs = load_runs([p])
        m, spec = runs[0].machine, runs[0].spec
        commit = f", commit {m['commit']}" if m.get("commit") else ""
        lines += [f"**{spec['model']}** ({spec.get('num_layers') or 'all'} layers), {spec['world_size']} x "
                  f"{device_name(runs[0])}, torch {m.get('torch')}{commit} — `{Path(p).name}`", "",
                  "| MNT | spread | strategy | tok/s/GPU | vs dep | tok/s/busy GPU | TTFT p50 / p99 ms "
                  "| at collectives | exposed wait | pull GB/s | a2a GB/s (ceiling) | peak GiB |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            label, x = _spread(r)
            ref = r.results.get(BASELINE)
            base = ref.tps_per_gpu if ref is not None and not ref.skipped else None
            for strat, s in r.results.items():
                if s.skipped:
                    lines.append(f"| {r.mnt} | {x:g} | {strat} | skipped: does not fit |" + " |" * 8)
                    continue
                a2a = "-"
                sent = [rk.a2a_sent_bytes for rk in s.ranks if rk.a2a_sent_bytes is not None]
                if sent:
                    achieved = sum(sent) / sum(rk.collective_s for rk in s.ranks) / 1e9
                    ceil = [rk.a2a_ceiling_gbps for rk in s.ranks if rk.a2a_ceiling_gbps]
                    a2a = f"{achieved:.0f}" + (f" ({sum(ceil) / len(ceil):.0f})" if ceil else "")
                name = strat + (f" ({s.diagnostic})" if s.diagnostic else "")
                lines.append(
                    f"| {r.mnt} | {x:g} | {name} | {s.tps_per_gpu:,.0f} | "
                    + (f"{s.tps_per_gpu / base:.2f}" if base else "-")
                    + f" | {s.tps_per_busy_gpu:,.0f} | {s.ttft_s.p50 * 1e3:.0f} / {s.ttft_s.p99 * 1e3:.0f} | "
                    + (f"{100 * s.collective_share:.1f}%" if s.collective_share is not None else "-") + " | "
                    + (f"{100 * s.exposed_wait_share:.2f}%" if s.exposed_wait_share is not None else "-") + " | "
                    + (f"{s.pull_gbps:.0f}" if s.pull_gbps else "-") + f" | {a2a} | "
                    + f"{s.peak_memory_bytes / 2**30:.1f} |")
        lines.append("")
    return "\n".join(lines)


def _setting(run: BenchRun) -> tuple:
    """What makes two runs repetitions of one measurement (machine and seed aside)."""
    w, sp = run.workload, run.spec
    return (sp["model"], sp.get("num_layers"), sp["world_size"], sp.get("group_size"), sp.get("expert_dtype"),
            run.mnt, w["dist"], w["isl"], w["cv"], w["ratio"], sp.get("skew", 0.0), w["num_requests"],
            # the engine's own knobs: a run with other settings is another measurement
            tuple(str(sp.get(k)) for k in ("local_experts", "slice_mb", "copy_streams", "pull_pacing", "short_steps",
                                            "dep_transport", "dep_overlap", "dep_wire", "balance_tail")))


def repetitions_markdown(paths: list[str]) -> str:
    """Runs of the same setting across files (repetitions) as one row per strategy:
    tok/s/GPU and its ratio to dep as min / median / max, the median per-rank split of
    busy time into compute (outside collectives and waits), transfer and waiting for peers,
    and for dep its all-to-all rate (bytes sent over time in transfer, waiting excluded)
    beside NCCL's all-to-all ceiling measured in the same file (--ceilings)."""
    import numpy as np

    runs_all = load_runs(paths)
    groups: dict[tuple, list[BenchRun]] = {}
    for r in runs_all:
        groups.setdefault(_setting(r), []).append(r)
    ceilings: dict[int, list[float]] = {}  # per file (its machine record): measured once per process
    for r in runs_all:
        for s in r.results.values():
            ceilings.setdefault(id(r.machine), []).extend(rk.a2a_ceiling_gbps for rk in s.ranks if rk.a2a_ceiling_gbps)
    m = next(iter(groups.values()))[0].machine
    commits = ", ".join(dict.fromkeys(str(r.machine["commit"]) for r in runs_all if r.machine.get("commit")))
    first = next(iter(groups.values()))[0]
    lines = [f"{len(paths)} files, {device_name(first)} x{next(iter(groups))[2]}, torch {m.get('torch')}"
             + (f", commit {commits}" if commits else ""), "",
             "| model (layers) | experts | MNT | ISL | CV | skew | strategy | reps | tok/s/GPU min / med / max "
             "| vs dep min / med / max | compute s | transfer s | peer wait s | busy s | a2a GB/s (ceiling) |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt3 = lambda xs, f: " / ".join(f.format(x) for x in (min(xs), float(np.median(xs)), max(xs)))  # noqa: E731
    for key, runs in sorted(groups.items(), key=lambda kv: tuple(f"{x:012.4f}" if isinstance(x, (int, float))
                                                                 else str(x) for x in kv[0])):
        model, layers, _, _, edt, mnt, _, isl, cv, _, skew, _, _ = key
        for strat in runs[0].results:
            res = [r.results[strat] for r in runs if strat in r.results and not r.results[strat].skipped]
            if not res:
                continue
            tps = [x.tps_per_gpu for x in res]
            ratio = [r.results[strat].tps_per_gpu / r.results[BASELINE].tps_per_gpu for r in runs
                     if BASELINE in r.results and not r.results[BASELINE].skipped and strat in r.results]
            ranks = [rk for x in res for rk in x.ranks]
            med = lambda f: float(np.median([f(rk) or 0.0 for rk in ranks]))  # noqa: E731
            a2a = "-"
            rates = [sum(rk.a2a_sent_bytes for rk in x.ranks) / sum(rk.transfer_s for rk in x.ranks) / 1e9 for x in res
                     if all(rk.a2a_sent_bytes is not None and rk.transfer_s for rk in x.ranks)]
            if rates:
                own = [rk.a2a_ceiling_gbps for x in res for rk in x.ranks if rk.a2a_ceiling_gbps]
                ceil = own or [c for r in runs for c in ceilings.get(id(r.machine), [])]  # else the file's
                a2a = f"{float(np.median(rates)):.3g}" + (f" ({sum(ceil) / len(ceil):.0f})" if ceil else "")
            lines.append(f"| {model} ({layers or 'all'}) | {edt or 'same'} | {mnt} | {isl} | {cv:g} | {skew:g} | {strat} | "
                         f"{len(res)} | {fmt3(tps, '{:,.0f}')} | {fmt3(ratio, '{:.3f}') if ratio else '-'} | "
                         f"{med(lambda rk: rk.compute_s):.3f} | {med(lambda rk: rk.transfer_s):.3f} | "
                         f"{med(lambda rk: rk.peer_wait_s):.4f} | {med(lambda rk: rk.busy_s):.3f} | {a2a} |")
    return "\n".join(lines)
