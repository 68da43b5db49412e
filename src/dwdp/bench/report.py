"""``dwdp report``: PNG plots from ``dwdp bench`` JSON files.

* throughput.png: tokens/s per GPU against the workload's length spread (CV, or the
  input ratio for uniform lengths), one line per strategy and MNT;
* breakdown.png: per-rank time of each strategy, split into compute, time at
  collectives (dep) or exposed prefetch wait (dwdp), and idle until the last rank ends;
* ttft.png: TTFT percentiles per strategy;
* isl_sweep.png (runs at several ISLs): tokens/s per GPU against the ISL per strategy and
  MNT, with ``dwdp plan``'s prediction for each run drawn dashed beside it when a hardware
  profile is given.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..strategy.registry import STRATEGIES
from ..strategy.spec import BASELINE
from .schema import BenchRun, load_runs


def _spread(run: BenchRun) -> tuple[str, float]:
    w = run.workload
    if w["dist"] == "uniform":
        return "input ratio (uniform lengths)", w["ratio"]
    return "ISL coefficient of variation", w["cv"]


def _title(runs: list[BenchRun]) -> str:
    spec = runs[0].spec
    return f"{spec['model']} ({spec.get('num_layers') or 'all'} layers), {spec['world_size']} ranks"


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
    ax.set_ylabel("input tokens / s / GPU")
    ax.set_ylim(bottom=0)
    ax.set_title(_title(runs) + (f"; dashed: dwdp plan ({hw.name})" if hw is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = out / "isl_sweep.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return str(p)


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

    # Throughput vs spread.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, int], list[tuple[float, float]]] = {}
    xlabel = None
    for r in runs:
        xlabel, x = _spread(r)
        for strat, s in r.results.items():
            if not s.skipped:
                lines.setdefault((strat, r.mnt), []).append((x, s.tps_per_gpu))
    styles = ["-", "--", ":", "-."]
    mnts = sorted({m for _, m in lines})
    for (strat, mnt), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors.get(strat),
                linestyle=styles[mnts.index(mnt) % len(styles)], label=f"{strat} MNT {mnt}")
    ax.set_xlabel(xlabel or "spread")
    ax.set_ylabel("input tokens / s / GPU")
    ax.set_ylim(bottom=0)
    ax.set_title(_title(runs))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "throughput.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(str(p))

    # Per-rank breakdown of the run with the largest spread (most imbalance).
    run = max(runs, key=lambda r: _spread(r)[1])
    strategies = [k for k, v in run.results.items() if not v.skipped]
    if strategies:
        fig, axes = plt.subplots(1, len(strategies), figsize=(4 * len(strategies), 4), sharey=True, squeeze=False)
        for ax, strat in zip(axes[0], strategies):
            ranks = run.results[strat].ranks
            xs = [str(rr.rank) for rr in ranks]
            wait = [rr.wait_s for rr in ranks]
            compute = [rr.busy_s - w for rr, w in zip(ranks, wait)]
            idle = [rr.idle_s for rr in ranks]
            ax.bar(xs, compute, label="compute", color="tab:green")
            if any(rr.collective_s is not None for rr in ranks):
                ax.bar(xs, wait, bottom=compute, color="tab:orange", label="at collectives")
            elif any(rr.exposed_wait_s is not None for rr in ranks):
                ax.bar(xs, wait, bottom=compute, color="tab:orange", label="exposed prefetch wait")
            ax.bar(xs, idle, bottom=[c + w for c, w in zip(compute, wait)], color="lightgray", label="idle")
            ax.set_title(strat)
            ax.set_xlabel("rank")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("seconds")
        label, x = _spread(run)
        fig.suptitle(f"per-rank time, {label} = {x:g}, MNT {run.mnt}")
        fig.tight_layout()
        p = out / "breakdown.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(str(p))

        fig, ax = plt.subplots(figsize=(6, 4))
        qs = ("p50", "p90", "p99")
        width = 0.8 / len(strategies)
        for i, strat in enumerate(strategies):
            t = run.results[strat].ttft_s
            ax.bar([j + i * width for j in range(len(qs))], [getattr(t, q) * 1e3 for q in qs], width, label=strat,
                   color=colors.get(strat))
        ax.set_xticks([j + width * (len(strategies) - 1) / 2 for j in range(len(qs))], qs)
        ax.set_ylabel("TTFT ms")
        ax.set_title(f"TTFT, {label} = {x:g}")
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
        gpus = m.get("gpus") or ["cpu"]
        lines += [f"**{spec['model']}** ({spec.get('num_layers') or 'all'} layers), {spec['world_size']} x {gpus[0]}, "
                  f"torch {m.get('torch')}, commit {m.get('commit')} — `{Path(p).name}`", "",
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
    commits = ", ".join(dict.fromkeys(str(r.machine.get("commit")) for r in runs_all))
    lines = [f"{len(paths)} files, {(m.get('gpus') or ['cpu'])[0]} x{next(iter(groups))[2]}, torch {m.get('torch')}, "
             f"commit {commits}", "",
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
