"""The strategies' descriptions by name: the one place that maps a name to what it is."""

from __future__ import annotations

from .base import StrategyDescription
from .dep import ExpertParallel
from .dp import DataParallel
from .dwdp import DistributedWeights

STRATEGIES: dict[str, StrategyDescription] = {s.name: s for s in (DataParallel(), ExpertParallel(),
                                                                   DistributedWeights())}


def describe(name: str) -> StrategyDescription:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
