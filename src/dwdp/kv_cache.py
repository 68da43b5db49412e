"""The decode KV cache: allocated once, one fixed slot of ``max_context`` tokens per
running sequence, written in place.

Per layer the cache is a pair of 4-D tensors ``k [slots, max_context, kv_heads, Dk]`` and
``v [slots, max_context, kv_heads, Dv]`` that the decode attention reads directly:

- GQA: the roped keys and the values, as the model produces them.
- MLA: one latent buffer ``[latent | roped key]`` (kv_lora_rank + rope dim wide, one
  "head"); ``v`` is a view of its first kv_lora_rank columns (absorbed-form decode reads
  the compressed cache only, as DeepSeek's own inference code does).

Fixed slots keep every address static (a CUDA graph replays the step), and a sequence's
keys contiguous for the attention kernel; the price is memory for ``max_context`` tokens
per slot, sized by the caller.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .models.transformer import LayerKV


class SlotKVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_context: int, dtype: torch.dtype,
                 device: torch.device | str):
        if max_context > cfg.max_position_embeddings:
            raise ValueError(f"max_context {max_context} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        self.cfg, self.num_slots, self.max_context = cfg, num_slots, max_context
        self.is_mla = cfg.is_mla
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(cfg.num_layers):
            if self.is_mla:
                latent = torch.zeros(num_slots, max_context, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                     dtype=dtype, device=device)
                self.layers.append((latent, latent[..., :cfg.kv_lora_rank]))
            else:
                shape = (num_slots, max_context, cfg.num_kv_heads, cfg.head_dim)
                self.layers.append((torch.zeros(shape, dtype=dtype, device=device),
                                    torch.zeros(shape, dtype=dtype, device=device)))

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + (0 if self.is_mla else v.numel() * v.element_size())
                   for k, v in self.layers)

    def write_prompt(self, slot: int, kv: list[LayerKV]) -> int:
        """Copy a prefilled prompt's cache (per layer, packed over its tokens, as the prefill
        returns it) into ``slot``; returns its length."""
        n = kv[0][0].shape[0] if kv else 0
        if n > self.max_context:
            raise ValueError(f"a {n}-token prompt does not fit a {self.max_context}-token cache slot")
        if len(kv) != len(self.layers):
            raise ValueError(f"the prompt cache has {len(kv)} layers, the model {len(self.layers)}")
        for (k, v), (a, b) in zip(self.layers, kv):
            if self.is_mla:  # (latent [T, rank], roped key [T, rope])
                k[slot, :n, 0].copy_(torch.cat([a, b], dim=-1))
            else:
                k[slot, :n].copy_(a)
                v[slot, :n].copy_(b)
        return n

    def read_prompt(self, slot: int, n: int) -> list[LayerKV]:
        """The first ``n`` tokens of ``slot`` in the prefill's packed layout (tests, handoff)."""
        r = self.cfg.kv_lora_rank
        if self.is_mla:
            return [(k[slot, :n, 0, :r], k[slot, :n, 0, r:]) for k, _ in self.layers]
        return [(k[slot, :n], v[slot, :n]) for k, v in self.layers]
