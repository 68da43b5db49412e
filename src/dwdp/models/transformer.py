"""The decoder-only MoE transformer, for the qwen3_moe and deepseek_v2/v3 families.

Module and parameter names follow the Hugging Face checkpoints (``model.layers.3.
self_attn.q_proj.weight`` ...) so loading is a name lookup; the only exception is the
routed experts, fused per layer into ``w13``/``w2`` (see :mod:`.moe`).

The forward pass takes a :class:`~dwdp.batch.PackedBatch` and returns the last-token
logits of each sequence and the KV cache entries its new tokens produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..batch import PackedBatch
from ..config import ModelConfig
from .attention import decode_attention, packed_causal_attention
from .layers import DenseMLP, RMSNorm, Rotary, merged_linear, merged_parts, weight_of, yarn_softmax_scale
from .moe import MoEBlock

# DeepSeek's reference code (and transformers') builds the two MLA latent norms with the
# RMSNorm default eps, whatever config.rms_norm_eps says.
MLA_LATENT_NORM_EPS = 1e-6

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""Per-token cache of one layer, packed over tokens: GQA (k, v) [T, kv_heads, d];
MLA (compressed kv after its norm [T, kv_lora_rank], roped shared key [T, rope_dim])."""


@dataclass
class ForwardContext:
    batch: PackedBatch
    cos: torch.Tensor
    sin: torch.Tensor
    cu_q_dev: torch.Tensor
    cu_k_dev: torch.Tensor


@dataclass
class DecodeContext:
    """One decode step: a token per sequence, each at ``positions[b]`` of cache slot ``slots[b]``."""

    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64: where this token's key goes
    lens: torch.Tensor  # [B] int32: keys to attend to (positions + 1)
    max_len: int | None  # longest lens, when known on the host (reference attention path)


def _with_prefix(prefix: torch.Tensor, new: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Interleave cached prefixes and new tokens: [p_0, n_0, p_1, n_1, ...]."""
    parts = []
    cp, cq = batch.cu_prefix, batch.cu_q
    for i in range(batch.num_seqs):
        parts += [prefix[cp[i]:cp[i + 1]], new[cq[i]:cq[i + 1]]]
    return torch.cat(parts)


class GQAAttention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.rope, self.d)
        self.scale = self.d ** -0.5
        self.qkv: tuple[torch.Tensor, ...] | None = None  # q/k/v weights as one tensor (build_model)

    def _qkv(self, x, cos, sin):
        """q, k (normed and roped, one kernel each on CUDA), v: [T, heads, d]."""
        T = x.shape[0]
        qkv = merged_parts(self.qkv, (self.q_proj, self.k_proj, self.v_proj))
        if qkv is not None:
            q, k, v = merged_linear(x, qkv).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.rotary.apply_into(q.view(T, self.h, self.d), cos, sin, norm=self.q_norm)
        k = self.rotary.apply_into(k.view(T, self.hkv, self.d), cos, sin, norm=self.k_norm)
        # v contiguous: it is kept as the KV cache entry, which must not hold the q|k|v buffer alive.
        return q, k, v.reshape(T, self.hkv, self.d).contiguous()

    def forward(self, x, ctx: ForwardContext, past: LayerKV | None):
        T = x.shape[0]
        q, k, v = self._qkv(x, ctx.cos, ctx.sin)
        k_all, v_all = (k, v) if past is None else (_with_prefix(past[0], k, ctx.batch),
                                                     _with_prefix(past[1], v, ctx.batch))
        b = ctx.batch
        o = packed_causal_attention(q, k_all, v_all, b.cu_q, b.cu_k, self.scale, ctx.cu_q_dev, ctx.cu_k_dev)
        return self.o_proj(o.reshape(T, -1)), (k, v)

    def decode(self, x, ctx: DecodeContext, cache: tuple[torch.Tensor, torch.Tensor]):
        """Write this step's keys/values into the cache slots in place, attend over them."""
        B = x.shape[0]
        q, k, v = self._qkv(x, ctx.cos, ctx.sin)
        cache[0].index_put_((ctx.slots, ctx.positions), k)
        cache[1].index_put_((ctx.slots, ctx.positions), v)
        o = decode_attention(q, cache[0], cache[1], ctx.slots, ctx.lens, self.scale, ctx.max_len)
        return self.o_proj(o.reshape(B, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q, compressed kv, decoupled rope.

    The cache keeps the compressed latent and the shared roped key (what decode reads);
    prefill expands them to per-head keys and values.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h = cfg.num_heads
        self.nope, self.rope_d, self.vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        qd = self.nope + self.rope_d
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.h * qd, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, MLA_LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.h * qd, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope_d, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, MLA_LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, self.h * (self.nope + self.vd), bias=False)
        self.o_proj = nn.Linear(self.h * self.vd, cfg.hidden_size, bias=cfg.attention_bias)
        self.rotary = Rotary(cfg.rope, self.rope_d, interleaved=cfg.rope_interleave)
        self.scale = qd ** -0.5 * yarn_softmax_scale(cfg.rope)
        self.qkv_a: tuple[torch.Tensor, ...] | None = None  # q_a and kv_a weights as one tensor (build_model)

    def _q_and_latent(self, x, cos, sin):
        """q [T, h, nope + rope] with its rope part rotated in place (no concatenation),
        the normed latent c_kv [T, rank] and the roped shared key [T, rope]."""
        T = x.shape[0]
        if hasattr(self, "q_proj"):
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            qkv_a = merged_parts(self.qkv_a, (self.q_a_proj, self.kv_a_proj_with_mqa))
            if qkv_a is not None:
                q_a, kv_a = merged_linear(x, qkv_a).split([self.q_b_proj.in_features, self.rank + self.rope_d], -1)
            else:
                q_a, kv_a = self.q_a_proj(x), self.kv_a_proj_with_mqa(x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.view(T, self.h, self.nope + self.rope_d)
        q_rot = q[..., self.nope:]
        self.rotary.apply_into(q_rot, cos, sin, out=q_rot)
        c_kv, k_rot = kv_a.split([self.rank, self.rope_d], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_rot = self.rotary.apply_into(k_rot[:, None, :], cos, sin)[:, 0]
        return q, c_kv, k_rot

    def forward(self, x, ctx: ForwardContext, past: LayerKV | None):
        T = x.shape[0]
        q, c_kv, k_rot = self._q_and_latent(x, ctx.cos, ctx.sin)
        new_kv = (c_kv, k_rot)
        if past is not None:
            c_kv, k_rot = _with_prefix(past[0], c_kv, ctx.batch), _with_prefix(past[1], k_rot, ctx.batch)
        Tk = c_kv.shape[0]
        kv = self.kv_b_proj(c_kv).view(Tk, self.h, self.nope + self.vd)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k = kv.new_empty(Tk, self.h, self.nope + self.rope_d)  # [k_nope | shared roped key], no cat
        k[..., :self.nope] = k_nope
        k[..., self.nope:] = k_rot[:, None, :]
        b = ctx.batch
        o = packed_causal_attention(q, k, v, b.cu_q, b.cu_k, self.scale, ctx.cu_q_dev, ctx.cu_k_dev)
        return self.o_proj(o.reshape(T, -1)), new_kv

    def decode(self, x, ctx: DecodeContext, cache: tuple[torch.Tensor, torch.Tensor]):
        """Absorbed MLA: queries move into the latent space (W_UK), attention reads the
        compressed cache [latent | roped key] as one head, the output leaves it through W_UV.
        The same scores and outputs as :meth:`forward`'s expanded form, in exact arithmetic."""
        B = x.shape[0]
        q, c_kv, k_rot = self._q_and_latent(x, ctx.cos, ctx.sin)
        q_nope, q_rot = q.split([self.nope, self.rope_d], dim=-1)
        cache[0].index_put_((ctx.slots, ctx.positions), torch.cat([c_kv, k_rot], dim=-1)[:, None, :])
        w = weight_of(self.kv_b_proj, x.dtype).view(self.h, self.nope + self.vd, self.rank)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w[:, :self.nope])  # [h, B, rank]
        q_full = torch.cat([q_lat.transpose(0, 1), q_rot], dim=-1)  # [B, h, rank + rope]
        o_lat = decode_attention(q_full, cache[0], cache[1], ctx.slots, ctx.lens, self.scale, ctx.max_len,
                                 v_is_k=True)  # [B, h, rank]
        o = torch.bmm(o_lat.transpose(0, 1), w[:, self.nope:].transpose(1, 2))  # [h, B, vd]
        return self.o_proj(o.transpose(0, 1).reshape(B, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.self_attn = MLAttention(cfg) if cfg.is_mla else GQAAttention(cfg)
        self.is_moe = cfg.moe_layer_mask[idx]
        self.mlp = MoEBlock(cfg) if self.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _norm_in(self, y, resid):
        """The residual stream after adding the previous layer's MLP output ``y`` (none for
        the first layer: ``y`` is the stream) and its input norm, in one pass on CUDA."""
        if resid is None:
            return self.input_layernorm(y), y
        return self.input_layernorm.add_forward(y, resid)

    def forward(self, y, ctx: ForwardContext, past: LayerKV | None, resid: torch.Tensor | None = None):
        """-> (this layer's MLP output, the residual stream before it is added, KV): the
        add happens fused with the next layer's input norm (or the final norm)."""
        h, resid = self._norm_in(y, resid)
        a, kv = self.self_attn(h, ctx, past)
        h, resid = self.post_attention_layernorm.add_forward(a, resid)  # resid + a and its norm in one pass
        return self.mlp(h), resid, kv

    def decode(self, y, ctx: DecodeContext, cache, resid: torch.Tensor | None = None):
        h, resid = self._norm_in(y, resid)
        h, resid = self.post_attention_layernorm.add_forward(self.self_attn.decode(h, ctx, cache), resid)
        return self.mlp(h), resid


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # [num_seqs, vocab], fp32, at each sequence's last new token
    kv: list[LayerKV]  # per layer, packed over the batch's new tokens (batch.cu_q)
    token_logits: torch.Tensor | None = None  # [len(logits_at), vocab] fp32, when asked (prompt logprobs)


class MoECausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def check_prompt_lengths(self, batch: PackedBatch) -> None:
        limit = self.config.max_position_embeddings
        for i, (p, n) in enumerate(zip(batch.prefix_lens, batch.seq_lens)):
            if p + n > limit:
                raise ValueError(
                    f"sequence {i} reaches {p + n} tokens, over the model's max_position_embeddings={limit}; "
                    "shorten the prompt"
                )

    @torch.inference_mode()
    def forward(self, batch: PackedBatch, past: list[LayerKV] | None = None,
                logits_at: torch.Tensor | None = None) -> PrefillOutput:
        """``past``: per layer, the cached prefixes of the batch's sequences packed by
        ``batch.cu_prefix`` (omit when every prefix is empty). ``logits_at``: packed token
        indices whose logits are also returned (``token_logits``; only when asked: a
        prompt's logits cost a vocab-wide row per token)."""
        self.check_prompt_lengths(batch)
        if past is None and any(batch.prefix_lens):
            raise ValueError("the batch continues cached sequences (prefix_lens > 0) but no past KV was given")
        ids = batch.input_ids
        lo, hi = batch.id_bounds if batch.id_bounds is not None else (
            (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0))
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}) for this model")
        meta = batch.meta()
        x = self.model.embed_tokens(ids)
        rot = self.model.layers[0].self_attn.rotary
        cos, sin = rot.cos_sin(meta.positions, x.dtype)
        cu_q_dev, cu_k_dev = meta.cu_q, meta.cu_k
        ctx = ForwardContext(batch, cos, sin, cu_q_dev, cu_k_dev)
        kvs: list[LayerKV] = []
        resid = None
        for i, layer in enumerate(self.model.layers):
            x, resid, kv = layer(x, ctx, None if past is None else past[i], resid)
            kvs.append(kv)
        li = meta.last_index
        last = self.model.norm(x[li] if resid is None else resid[li] + x[li])  # the last add: last tokens only
        extra = None if logits_at is None else self.lm_head(
            self.model.norm(x[logits_at] if resid is None else resid[logits_at] + x[logits_at])).float()
        return PrefillOutput(self.lm_head(last).float(), kvs, extra)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               cache_layers: list[tuple[torch.Tensor, torch.Tensor]], max_len: int | None = None) -> torch.Tensor:
        """One decode step: token b sits at ``positions[b]`` of cache slot ``slots[b]`` (its
        key/value are written there, in place). Returns fp32 logits [B, vocab].

        No host sync on CUDA (given routed experts that need none): a CUDA graph can
        replay it. The caller validates ids and lengths (see :mod:`dwdp.decode`)."""
        x = self.model.embed_tokens(tokens)
        cos, sin = self.model.layers[0].self_attn.rotary.cos_sin(positions, x.dtype)
        ctx = DecodeContext(cos, sin, slots, positions, (positions + 1).to(torch.int32), max_len)
        resid = None
        for layer, cache in zip(self.model.layers, cache_layers):
            x, resid = layer.decode(x, ctx, cache, resid)
        h = self.model.norm(x) if resid is None else self.model.norm.add_forward(x, resid)[0]
        return self.lm_head(h).float()
