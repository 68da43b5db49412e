"""DWDP expert placement: which experts each rank of a group keeps and pulls.

E routed experts, group of N ranks; each rank keeps L experts of every MoE layer and
pulls P from each of its N-1 peers, so E = L + (N-1)P. Rank r keeps [rP, rP + L).
From a lower-numbered peer q it pulls q's first P experts [qP, qP + P); from a higher
one, q's last P, [qP + L - P, qP + L). L = P = E/N is a disjoint split; L > P makes
neighbours overlap, which cuts the bytes to pull and lets N not divide E.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class PlacementError(ValueError):
    """An impossible (E, N, L) combination; the message lists valid choices."""


@dataclass(frozen=True)
class PeerPull:
    peer: int
    start: int  # first global expert pulled
    count: int
    peer_offset: int  # index of `start` inside the peer's resident shard


def valid_local_counts(num_experts: int, group_size: int) -> list[int]:
    """Every L for which E = L + (N-1)P has an integer P with 0 < P <= L (or L = E alone)."""
    if group_size == 1:
        return [num_experts]
    return [L for L in range(math.ceil(num_experts / group_size), num_experts)
            if (num_experts - L) % (group_size - 1) == 0 and (num_experts - L) // (group_size - 1) <= L]


@dataclass(frozen=True)
class Placement:
    num_experts: int
    group_size: int
    local: int

    def __post_init__(self):
        E, N, L = self.num_experts, self.group_size, self.local
        if N < 1:
            raise PlacementError(f"group size N={N}: must be at least 1")
        if N > E:
            raise PlacementError(f"group size N={N} exceeds the {E} routed experts: each rank must own one")
        valid = valid_local_counts(E, N)
        if L not in valid:
            shown = ", ".join(map(str, valid[:12])) + (" ..." if len(valid) > 12 else "")
            raise PlacementError(
                f"L={L} local experts is impossible for E={E} experts on N={N} ranks: E - L must split evenly "
                f"into N-1={N - 1} peer pulls of P <= L experts. Valid L: {shown or 'none'}"
            )

    @classmethod
    def create(cls, num_experts: int, group_size: int, local: int | None = None) -> "Placement":
        """Smallest valid L (least memory, disjoint when N divides E) unless L is given."""
        if local is None:
            if not 1 <= group_size <= num_experts:
                return cls(num_experts, group_size, num_experts)  # raises, saying why
            valid = valid_local_counts(num_experts, group_size)
            if not valid:
                raise PlacementError(f"no placement exists for E={num_experts} experts on N={group_size} ranks")
            local = valid[0]
        return cls(num_experts, group_size, local)

    @classmethod
    def for_memory_budget(cls, num_experts: int, group_size: int, budget_bytes: float,
                          fixed_bytes: float, expert_bytes_all_layers: float,
                          expert_bytes_one_layer: float) -> "Placement":
        """Largest L (fewest bytes to pull) whose resident experts plus two prefetch slots
        plus the non-expert weights fit ``budget_bytes`` per GPU."""
        best = None
        for L in valid_local_counts(num_experts, group_size):
            need = fixed_bytes + L * expert_bytes_all_layers + 2 * (num_experts - L) * expert_bytes_one_layer
            if need <= budget_bytes:
                best = L
        if best is None:
            L0 = valid_local_counts(num_experts, group_size)[0]
            need = fixed_bytes + L0 * expert_bytes_all_layers + 2 * (num_experts - L0) * expert_bytes_one_layer
            raise PlacementError(
                f"even the smallest placement (L={L0}) needs {need / 2**30:.1f} GiB per GPU, over the budget "
                f"of {budget_bytes / 2**30:.1f} GiB: use a larger group or a smaller model"
            )
        return cls(num_experts, group_size, best)

    @property
    def pull(self) -> int:
        """P: experts pulled from each peer."""
        return 0 if self.group_size == 1 else (self.num_experts - self.local) // (self.group_size - 1)

    @property
    def remote(self) -> int:
        return self.num_experts - self.local

    def local_range(self, rank: int) -> range:
        self._check_rank(rank)
        return range(rank * self.pull, rank * self.pull + self.local)

    def pulls(self, rank: int) -> list[PeerPull]:
        """What ``rank`` pulls, in global expert order."""
        self._check_rank(rank)
        P, L, out = self.pull, self.local, []
        for q in range(self.group_size):
            if q < rank:
                out.append(PeerPull(q, q * P, P, 0))
            elif q > rank:
                out.append(PeerPull(q, q * P + L - P, P, L - P))
        return out

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.group_size:
            raise PlacementError(f"rank {rank} is outside the group of {self.group_size}")

    def describe(self) -> str:
        kind = "disjoint" if self.local == self.pull or self.group_size == 1 else "overlapping"
        return (f"E={self.num_experts} N={self.group_size} L={self.local} P={self.pull} ({kind}; each rank "
                f"pulls {self.remote} experts per MoE layer)")
