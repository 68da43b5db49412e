"""Every check of `dwdp plan` in one command, from the committed raw files: the paper
comparison (with the paper's iteration breakdown beside the predicted components) and the
measured-machine validations (datasheet and calibrated profiles against `dwdp bench` runs,
one-GPU prefill and decode steps, a one-GPU server under loadtests). No GPU needed.

    PYTHONPATH=src python benchmarks/planner_tables.py > docs/PLANNER_TABLES.md

Sections can be chosen (``paper bench one-gpu scaling``) and the scaling table cut to some
group sizes (``--groups 4,8,16``): the tests regenerate a subset this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from dwdp.bench.schema import load_runs
from dwdp.planner.hardware import PROFILES, HardwareProfile
from dwdp.planner.model import CostModel
from dwdp.planner.paper import _base, breakdown, markdown, paper_points
from dwdp.planner.plan import validate
from dwdp.planner.serving import decode_step_s, fit_server_overhead, simulate_colocated
from dwdp.presets import resolve_model

RESULTS = Path(__file__).resolve().parent / "results"
# Runs before commit c36bb69 used FlashAttention-2 varlen prefill attention (0.35 of the bf16
# peak); the built-in profiles now describe the cuDNN path (0.55). A datasheet check of an old
# run uses the fraction of the engine that ran it.
FA2_ATTN = 0.35


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def paper_section() -> list[str]:
    pts = paper_points()
    n5 = sum(abs(p.error) <= 0.05 for p in pts)
    out = ["## The paper (`dwdp plan --paper`)", "", markdown(pts), "",
           f"{n5} of {len(pts)} within 5%, {sum(abs(p.error) <= 0.15 for p in pts)} within 15%.", ""]
    # The paper's iteration breakdown (DWDP4 vs DEP4, ISL 8K ratio 0.8, MNT 32K), per component.
    b = breakdown(_base())
    out += ["Iteration breakdown, ISL 8K ratio 0.8, MNT 32K (the paper's; DWDP compute = its step "
            "less its exposed wait, against dp's compute of the same steps):", "",
            "| component | paper | predicted |", "|---|---:|---:|",
            f"| DEP all-to-all share of the iteration | 9.6% | {100 * b['a2a_share']:.1f}% |",
            f"| DEP waiting for the slowest rank | 12.3% | {100 * b['sync_share']:.1f}% |",
            f"| DWDP exposed prefetch wait | hidden | {100 * b['dwdp_exposed_share']:.1f}% |",
            f"| DWDP compute slowdown under pulls | +9.7% (the paper's figures as we read them) | "
            f"{pct(b['dwdp_compute_slowdown'])} |",
            f"| DWDP iteration / DEP iteration | 0.857 | {b['dwdp_over_dep_step']:.3f} |", ""]
    return out


def validation_rows(files: list[Path], hw: HardwareProfile) -> list[dict]:
    return validate(load_runs([str(f) for f in files]), hw)


def validation_table(title: str, rows: list[dict]) -> list[str]:
    out = [f"### {title}", "", "| model | MNT | CV | strategy | step ms meas / pred | error | compute s | transfer s "
           "| wait s |", "|---|---:|---:|---|---|---:|---|---|---|"]
    for r in rows:
        comp = []
        for k in ("compute_s", "transfer_s", "wait_s"):
            m = r.get(f"measured_{k}")
            comp.append("-" if m is None else f"{m:.3f} / {r[f'predicted_{k}']:.3f}")
        out.append(f"| {r['model']} | {r['mnt']} | {r['cv']:g} | {r['strategy']} | {1e3 * r['measured_step_s']:.1f} / "
                   f"{1e3 * r['predicted_step_s']:.1f} | {pct(r['step_error'])} | " + " | ".join(comp) + " |")
    errs = [abs(r["step_error"]) for r in rows]
    out += ["", f"{sum(e <= 0.10 for e in errs)} of {len(errs)} within 10%, {sum(e <= 0.25 for e in errs)} within 25%; "
                f"mean |error| {100 * np.mean(errs):.1f}%.", ""]
    return out


def bench_sections() -> list[str]:
    out = ["## Measured machines, multi-GPU `dwdp bench` runs (FlashAttention-2 era: before c36bb69)", ""]
    x2 = sorted((RESULTS / "2026-11-28_strong_dep_h200x2").glob("*rep*.json"))
    fa2 = dataclasses.replace(PROFILES["h200"], attn_eff=FA2_ATTN)
    out += validation_table(f"2x H200, datasheet `h200` (attention {FA2_ATTN}), {len(x2)} files", validation_rows(x2, fa2))
    cal2 = HardwareProfile.from_json(str(RESULTS / "2026-11-28_calibrate_h200x2/profile_2c138c9.json"))
    out += validation_table("2x H200, calibrated on the machine (profile_2c138c9)", validation_rows(x2, cal2))
    x4 = sorted((RESULTS / "2026-11-28_strong_dep_h200x4").glob("*.json"))
    cal4 = HardwareProfile.from_json(str(RESULTS / "2026-11-28_calibrate_h200x4/profile_h200x4.json"))
    out += validation_table(f"4x H200, datasheet `h200` (attention {FA2_ATTN}), {len(x4)} files",
                            validation_rows(x4, dataclasses.replace(PROFILES["h200"], attn_eff=FA2_ATTN)))
    out += validation_table("4x H200, calibrated on the machine (profile_h200x4)", validation_rows(x4, cal4))
    return out


def one_gpu_sections() -> list[str]:
    out = ["## One H200: prefill steps, decode steps, a server (datasheet `h200`)", "",
           "| prefill step | lengths | measured ms | predicted | error |", "|---|---|---:|---:|---:|"]
    steps = json.loads((RESULTS / "2026-11-29_cudnn_attention_h200/attention_backends_h200_71dd174.json").read_text())
    for r in steps["steps"]:
        cfg, _ = resolve_model(r["model"], r["layers"])
        pred = CostModel(cfg, PROFILES["h200"], "bf16").step_dp(r["lengths"], [0] * len(r["lengths"]))
        out.append(f"| {r['model']} ({r['layers']}) | {'+'.join(map(str, r['lengths']))} | "
                   f"{1e3 * r['auto']['seconds']:.1f} | {1e3 * pred:.1f} | {pct(pred / r['auto']['seconds'] - 1)} |")
    out += ["", "| decode step | experts | batch | context | measured ms | predicted | error |",
            "|---|---|---:|---:|---:|---:|---:|"]
    dec = json.loads((RESULTS / "2026-11-28_decode_h200/decode.json").read_text())
    for case in dec["cases"]:
        cfg, _ = resolve_model(case["model"], case["layers"])
        fmt = "bf16" if case["expert_dtype"] == "same" else "fp8"
        cm = CostModel(cfg, PROFILES["h200"], fmt)
        for row in case["rows"]:
            pred = decode_step_s(cm, row["batch"], row["context"])["step_s"]
            out.append(f"| {case['model']} ({case['layers']}) | {fmt} | {row['batch']} | {row['context']} | "
                       f"{1e3 * row['step_s_median']:.2f} | {1e3 * pred:.2f} | {pct(pred / row['step_s_median'] - 1)} |")
    out += ["", "| server (qwen3-235b 8 layers, FP8, ISL 4096, OSL 256) | in flight | tok/s/GPU meas / pred | "
            "tok/s/user | TTFT p50 ms | TTFT p90 ms |", "|---|---:|---|---|---|---|"]
    cfg, _ = resolve_model("qwen3-235b-a22b", 8)
    cm = CostModel(cfg, PROFILES["h200"], "fp8")
    runs = {"5 ms switch (0e13738)": "2026-11-29_serve_anatomy_h200/anatomy_0e13738.json",
            "0.5 ms switch (b7d6e5e)": "2026-11-29_serve_anatomy_h200/wakeups_switch05ms_b7d6e5e/anatomy_b7d6e5e.json",
            "decode overlap off (d4f135a)": "2026-11-29_decode_overlap_h200/serve_rep1/off/anatomy_d4f135a.json",
            "decode overlap on (d4f135a)": "2026-11-29_decode_overlap_h200/serve_rep1/on/anatomy_d4f135a.json"}
    for label, run in runs.items():
        rows = json.loads((RESULTS / run).read_text())["rows"]
        ov = fit_server_overhead(cm, 4096, 256, rows)
        for r in rows:
            m, s = r["loadtest"], simulate_colocated(cm, 4096, 256, 64, r["max_concurrency"], 64, 16384, ov)
            out.append(f"| {label} | {r['max_concurrency']} | {m['tps_per_gpu']:,.0f} / {s['tps_per_gpu']:,.0f} "
                       f"| {m['tps_per_user']:.0f} / {s['tps_per_user']:.0f} | "
                       f"{1e3 * m['ttft_s']['p50']:.0f} / {1e3 * s['ttft_p50_s']:.0f} | "
                       f"{1e3 * m['ttft_s']['p90']:.0f} / {1e3 * s['ttft_p90_s']:.0f} |")
    return out + [""]


SCALING_GROUPS = (4, 8, 16, 36, 72)


def scaling_section(groups=SCALING_GROUPS) -> list[str]:
    """docs/SCALING.md's table: one DWDP / DEP group of N GPUs in a GB200 NVL72 domain, at the
    paper comparison's operating point (DeepSeek-V3 at full depth, FP4 experts, FP8
    projections, vendor kernels, a loaded server), L = the smallest valid number of local
    experts."""
    from dwdp.strategy.placement import Placement
    from dwdp.strategy.spec import DEP, DWDP
    from dwdp.planner.paper import STEADY_REQUESTS
    from dwdp.planner.plan import memory_per_gpu, predict_all

    cfg, _ = resolve_model("deepseek-v3")
    out = ["## One group of N GPUs in an NVL72 domain (docs/SCALING.md)", "",
           "DeepSeek-V3 (61 layers), FP4 experts, FP8 projections, `gb200-nvl72` datasheet profile with vendor "
           f"kernels (as the paper comparison), ISL 8K normal with CV 0.2, MNT 32K, {STEADY_REQUESTS} requests per "
           "rank (a loaded server), L = the smallest valid number of local experts. Memory counts the non-expert "
           "weights in bf16 (FP8 projections would take about half of them off both columns).", "",
           "| N | L | DWDP memory/GPU | DEP memory/GPU | pull per MoE layer | pull GB/s per rank | DWDP tok/s/GPU "
           "| DEP tok/s/GPU | DWDP/DEP | DWDP exposed wait | DEP all-to-all | DEP waiting |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in groups:
        p = dataclasses.replace(_base(dist="normal", cv=0.2), group_size=n)  # the paper comparison's setting
        pr = predict_all(p, (DEP, DWDP))
        dep, dw = pr[DEP], pr[DWDP]
        pl = Placement.create(cfg.num_experts, n)
        cm = p.cost_model()
        mem = {s: memory_per_gpu(cfg, s, n, None, "fp4", p.mnt) / 2**30 for s in (DWDP, DEP)}
        out.append(f"| {n} | {pl.local} | {mem[DWDP]:.1f} GiB | {mem[DEP]:.1f} GiB | "
                   f"{1e3 * cm.pull_seconds(pl):.1f} ms | {cm.pull_gbps(n):.0f} | {dw.tps_per_gpu:,.0f} | "
                   f"{dep.tps_per_gpu:,.0f} | {dw.tps_per_gpu / dep.tps_per_gpu:.2f} | "
                   f"{100 * np.sum(dw.extra['exposed_wait_s']) / sum(dw.busy_s):.1f}% | "
                   f"{100 * dep.extra['a2a_s'] * n / sum(dep.busy_s):.1f}% | {100 * dep.extra['sync_share']:.1f}% |")
    return out + [""]


SECTIONS = ("paper", "bench", "one-gpu", "scaling")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--groups", default=",".join(map(str, SCALING_GROUPS)),
                    help="group sizes of the scaling table (default: %(default)s)")
    args = ap.parse_args(argv)
    if set(args.sections) - set(SECTIONS):
        ap.error(f"unknown section {sorted(set(args.sections) - set(SECTIONS))[0]!r}; choose from {', '.join(SECTIONS)}")
    want = set(args.sections or SECTIONS)
    lines = ["# `dwdp plan` against everything it was checked on", "",
             "Generated by `PYTHONPATH=src python benchmarks/planner_tables.py > docs/PLANNER_TABLES.md` from the "
             "committed raw files; docs/PLANNER.md explains each check.", ""]
    if "paper" in want:
        lines += paper_section()
    if "bench" in want:
        lines += bench_sections()
    if "one-gpu" in want:
        lines += one_gpu_sections()
    if "scaling" in want:
        lines += scaling_section(tuple(int(g) for g in args.groups.split(",")))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
