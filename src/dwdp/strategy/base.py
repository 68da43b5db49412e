"""The interface every strategy's description implements (see :mod:`dwdp.strategy`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..config import ModelConfig
from .spec import RankPlan, RankSpec

if TYPE_CHECKING:
    from ..planner.model import CostModel, Prediction

# One step of a group of ranks stepping together (one rank unless the strategy is lockstep):
# each rank's (sequence lengths, cached prefix lengths) -> the step's seconds.
GroupStep = Callable[[list[tuple[list[int], list[int]]]], float]


class StrategyDescription:
    name: str
    lockstep: bool = False  # ranks must step together (collectives inside every step)
    grouped: bool = True  # ranks of a group share experts (dp: each rank alone)
    summary: str = ""
    color: str = "tab:gray"  # in plots

    # -- a rank ---------------------------------------------------------------------------
    def resolve(self, spec: RankSpec, cfg: ModelConfig, dtype: torch.dtype, device) -> RankSpec:
        """``spec`` with what depends on the rank's device made concrete (DWDP: ``-L auto``)."""
        return spec

    def plan(self, cfg: ModelConfig, spec: RankSpec, dtype: torch.dtype, group_size: int,
             group_rank: int) -> RankPlan:
        """Pure arithmetic on the config (no device, no group): which routed experts this rank
        stores and its exact weight bytes. The CLI calls it before spawning anything, so an
        impossible placement fails once, cleanly."""
        raise NotImplementedError

    # -- the planner ------------------------------------------------------------------------
    def memory_per_gpu(self, cfg: ModelConfig, n: int, local: int | None, expert_dtype: str, mnt: int,
                       dense_dtype: str = "bf16") -> float:
        """The planner's bytes per GPU (bf16 non-expert weights with ``dense_dtype`` projections,
        ``expert_dtype`` experts, one step's activations), for hardware the engine need not run on."""
        raise NotImplementedError

    def predict(self, cm: "CostModel", plans: list, n: int, local: int | None, skew: float, sliced: bool,
                seed: int, tokens: int) -> "Prediction":
        """Every rank's step times for its packed steps ``plans[rank]`` (the scheduler's
        (seq_lens, prefix_lens) per step), as the cost model ``cm`` prices this strategy."""
        raise NotImplementedError

    def group_step(self, cm: "CostModel", n: int, local: int | None, skew: float, sliced: bool,
                   seed: int) -> GroupStep:
        """The step-time function of one group (``n`` ranks if lockstep, else one)."""
        raise NotImplementedError

    def time_note(self, pred: "Prediction", n: int) -> str:
        """Where the time goes, one line for ``dwdp plan``'s table."""
        return "compute only"

    def components(self, pred: "Prediction", n: int) -> dict[str, float]:
        """Per-rank means of the predicted step components (as the bench JSON splits them):
        compute outside communication and waits, time moving bytes between GPUs, time
        waiting for peers."""
        busy = float(np.mean(pred.busy_s))
        return {"compute_s": busy, "transfer_s": 0.0, "wait_s": 0.0}
