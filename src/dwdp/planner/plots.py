"""``dwdp plan --sweep ... --png``: the predicted tokens/s of dep and dwdp over the swept value."""

from __future__ import annotations

from ..strategy.registry import STRATEGIES
from ..strategy.spec import DEP, DWDP


def sweep_png(p, what: str, rows: list[dict], path: str) -> None:
    """Plot :func:`~dwdp.planner.plan.sweep`'s rows for the plan input ``p`` into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r[what] for r in rows]
    for name in (DEP, DWDP):
        ax.plot(xs, [r[name] for r in rows], "o-", color=STRATEGIES[name].color, label=f"{name} (predicted)")
    ax.set_xlabel(what)
    ax.set_ylabel("input tokens / s / GPU")
    if what in ("isl", "mnt"):
        ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{p.cfg.name} on {p.hw.name}, N={p.group_size}, {p.expert_dtype} experts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
