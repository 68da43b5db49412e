"""Packed batches: many variable-length sequences as one flat token tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch


@dataclass
class PackedBatch:
    """New tokens of several sequences, back to back.

    ``prefix_lens[i]`` tokens of sequence i are already in the KV cache (a chunked
    prefill continues after them); positions of the new tokens start there.
    """

    input_ids: torch.Tensor  # [T] int64
    seq_lens: list[int]
    prefix_lens: list[int] = field(default_factory=list)
    id_bounds: tuple[int, int] | None = None  # (min, max) token id, known without a device sync
    _meta: "BatchMeta | None" = field(default=None, repr=False)

    def __post_init__(self):
        if not self.prefix_lens:
            self.prefix_lens = [0] * len(self.seq_lens)
        if len(self.prefix_lens) != len(self.seq_lens):
            raise ValueError("prefix_lens and seq_lens differ in length")
        if sum(self.seq_lens) != self.input_ids.numel():
            raise ValueError(f"seq_lens sum to {sum(self.seq_lens)} but there are {self.input_ids.numel()} tokens")
        if any(n <= 0 for n in self.seq_lens):
            raise ValueError("every sequence in a batch needs at least one new token")

    @classmethod
    def from_sequences(cls, seqs: list[list[int]] | list[torch.Tensor], device="cpu",
                       prefix_lens: list[int] | None = None) -> "PackedBatch":
        flat = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
        cpu = torch.cat(flat) if flat else torch.empty(0, dtype=torch.long)
        bounds = (int(cpu.min()), int(cpu.max())) if cpu.numel() and cpu.device.type == "cpu" else None
        return cls(cpu.to(device), [t.numel() for t in flat], list(prefix_lens or []), bounds)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def cu_q(self) -> list[int]:
        return [0, *accumulate(self.seq_lens)]

    @property
    def cu_k(self) -> list[int]:
        return [0, *accumulate(p + n for p, n in zip(self.prefix_lens, self.seq_lens))]

    @property
    def cu_prefix(self) -> list[int]:
        return [0, *accumulate(self.prefix_lens)]

    def meta(self) -> "BatchMeta":
        """Positions, cumulative lengths and last-token indices on the batch's device,
        built with one host-to-device copy and cached: an engine prepares them before the
        step, so the forward itself never waits on a transfer."""
        if self._meta is None:
            T, B = self.num_tokens, self.num_seqs
            pos = [torch.arange(p, p + n) for p, n in zip(self.prefix_lens, self.seq_lens)]
            host = torch.cat([torch.cat(pos) if pos else torch.empty(0, dtype=torch.long),
                              torch.tensor(self.cu_q + self.cu_k, dtype=torch.long),
                              torch.tensor(self.cu_q[1:], dtype=torch.long) - 1])
            dev = host.to(self.input_ids.device)
            cu = dev[T:T + 2 * (B + 1)].to(torch.int32)
            self._meta = BatchMeta(dev[:T], cu[:B + 1], cu[B + 1:], dev[T + 2 * (B + 1):])
        return self._meta


@dataclass
class BatchMeta:
    positions: torch.Tensor  # [T] int64
    cu_q: torch.Tensor  # [B + 1] int32
    cu_k: torch.Tensor  # [B + 1] int32 (prefix + new tokens)
    last_index: torch.Tensor  # [B] int64: each sequence's last new token
