"""The serving frontier: output tokens/s per GPU against tokens/s per user.

``dwdp loadtest --sweep-concurrency 1,4,16,64`` runs one load test per concurrency cap
against the same server and writes the points as one JSON file (``kind: "frontier"``,
with a ``label`` such as "dwdp-context"). ``dwdp report`` draws every frontier file it
is given on one plot (frontier.png: throughput per GPU vs per-user speed, and TTFT
p50/p90 against the offered load) and ``--markdown`` tabulates them. Moving along a
frontier trades per-user speed for per-GPU throughput; a configuration whose curve lies
above another's serves more tokens per GPU at the same per-user speed.
"""

from __future__ import annotations

import json
from pathlib import Path

FRONTIER_KIND = "frontier"


def sweep(run_one, caps: list[int], label: str, machine: dict | None = None, log=print) -> dict:
    """``run_one(max_concurrency) -> loadtest summary`` for each cap, in order."""
    if not caps or any(c < 1 for c in caps):
        raise ValueError("--sweep-concurrency needs positive integers, e.g. 1,4,16,64")
    points = []
    for i, cap in enumerate(caps):
        log(f"[{i + 1}/{len(caps)}] {label}: max concurrency {cap}")
        s = run_one(cap)
        s["max_concurrency"] = cap
        points.append(s)
    return {"kind": FRONTIER_KIND, "label": label, "machine": machine or {}, "points": points}


def is_frontier(path: str) -> bool:
    try:
        with open(path) as f:
            return json.load(f).get("kind") == FRONTIER_KIND
    except (OSError, ValueError, AttributeError):
        return False


def load_frontier(path: str) -> dict:
    with open(path) as f:
        d = json.load(f)
    if d.get("kind") != FRONTIER_KIND or not isinstance(d.get("points"), list):
        raise ValueError(f"{path}: not a frontier file (write one with dwdp loadtest --sweep-concurrency)")
    for i, p in enumerate(d["points"]):
        for key in ("tps_per_gpu", "tps_per_user", "ttft_s", "max_concurrency"):
            if key not in p:
                raise ValueError(f"{path}: point {i} lacks {key!r}")
    return d


def markdown(paths: list[str]) -> str:
    rows = ["| label | max concurrency | tok/s/GPU | tok/s/user | TTFT p50 (ms) | TTFT p90 (ms) | failed |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        d = load_frontier(path)
        for p in d["points"]:
            t = p["ttft_s"]
            rows.append(f"| {d['label']} | {p['max_concurrency']} | {p['tps_per_gpu']:.1f} | "
                        f"{(p['tps_per_user'] or 0):.1f} | {1e3 * (t.get('p50') or 0):.0f} | "
                        f"{1e3 * (t.get('p90') or 0):.0f} | {p.get('failed', 0)} |")
    return "\n".join(rows)


def render(paths: list[str], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    fronts = [load_frontier(p) for p in paths]
    labels = [d["label"] for d in fronts]
    for path, d in zip(paths, fronts):
        if labels.count(d["label"]) > 1:  # repetitions of one setting: tell them apart by file
            d["label"] = f"{d['label']} ({Path(path).stem})"
        pts = [p for p in d["points"] if p["tps_per_user"]]
        x = [p["tps_per_user"] for p in pts]
        (line,) = ax.plot(x, [p["tps_per_gpu"] for p in pts], marker="o", label=d["label"])
        for p in pts:
            ax.annotate(str(p["max_concurrency"]), (p["tps_per_user"], p["tps_per_gpu"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        caps = [p["max_concurrency"] for p in d["points"]]
        for q, style in (("p50", "-"), ("p90", "--")):
            ax2.plot(caps, [1e3 * (p["ttft_s"].get(q) or 0) for p in d["points"]], style, marker="o",
                     color=line.get_color(), label=f"{d['label']} {q}")
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_title("Serving frontier (labels: max concurrency)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("max concurrency (offered load)")
    ax2.set_ylabel("TTFT (ms)")
    ax2.set_title("Time to first token")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "frontier.png"
    fig.savefig(dest, dpi=130)
    plt.close(fig)
    return str(dest)
