"""Decode: generate from a prefill's KV cache, batched across requests.

A decode worker takes each request's prompt KV cache and first token (what a prefill
worker hands over), then steps all active requests together: one new token each per
step, sampled greedily or with temperature / top-k / top-p, until EOS or the request's
token limit. Decode runs on replicated or expert-parallel workers, not DWDP: a decode
step is far too short to hide a whole layer's pull.

The cache here is a per-request list of per-layer tensors, concatenated for each step:
simple and exact, O(context) copy per step; a paged cache is the next step for speed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .batch import PackedBatch
from .engine import _pack_layer, _sync
from .models.transformer import LayerKV, MoECausalLM


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    eos_token_id: int | None = None
    seed: int | None = None  # any 64-bit value, signed or not; None: fresh entropy per request
    logprobs: int | None = None  # also report the sampled token's logprob and the top-n alternatives

    def validate(self, vocab: int) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be an integer >= 1")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0 or self.top_k > vocab:
            raise ValueError(f"top_k must lie in [0, {vocab}]")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must lie in (0, 1]")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            raise ValueError("seed must be a 64-bit integer")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < vocab:
            raise ValueError(f"eos_token_id must lie in [0, {vocab})")
        if self.logprobs is not None and not 0 <= self.logprobs <= vocab:
            raise ValueError(f"logprobs must lie in [0, {vocab}]")


def make_generator(seed: int | None) -> torch.Generator:
    """A request's own sampling stream: its seed (any 64-bit value), else fresh OS entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % (1 << 64))  # negative / >= 2**63 seeds map onto the same 64 bits
    return g


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from fp32 logits [vocab]. Well defined for every validated ``p``: a
    temperature or top_p as small as 1e-300 degenerates to greedy, never to NaN."""
    x = logits.float()
    if p.temperature == 0 or not torch.isfinite(x).any():
        return int(x.argmax())
    # Shift first: every value is then <= 0 and the max exactly 0, so a tiny temperature
    # sends the others to -inf, never NaN; in float64, where a temperature of 1e-300 is not 0.
    x = (x.double() - x.max()) / p.temperature
    if p.top_k:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # smallest prefix whose mass reaches top_p
        keep[0] = True  # a top_p below fp32 resolution (1e-300 rounds to 0) still keeps the top token
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[idx[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` and its ``top_n`` most likely tokens (raw
    logits, before temperature / top-k / top-p, as OpenAI reports them)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, top_n) if top_n else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(lp[token]), pairs


@dataclass
class DecodeRequest:
    id: int | str
    kv: list[LayerKV]  # per layer, the prompt's cache
    first_token: int  # sampled from the prefill's last logits
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_len: int = 0
    generator: torch.Generator | None = None  # the request's sampling stream (default: from its seed)
    first_logprobs: tuple | None = None  # (logprob, top-n) of first_token, when params.logprobs is set


@dataclass
class _Active:
    req: DecodeRequest
    cache: list[LayerKV]
    tokens: list[int]
    gen: torch.Generator | None
    itl: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # per token, when params.logprobs is set
    error: str | None = None  # finish_reason "error": why this request (alone) failed


@dataclass
class DecodeResult:
    id: int | str
    tokens: list[int]  # generated tokens, the first one (from prefill) included
    finish_reason: str  # "stop" (EOS), "length", "cancelled" or "error"
    itl: list[float]  # seconds between consecutive tokens
    error: str | None = None


class DecodeEngine:
    def __init__(self, model: MoECausalLM, max_batch: int = 64):
        self.model = model
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.waiting: list[_Active] = []
        self.active: list[_Active] = []
        self.steps = 0

    def add(self, req: DecodeRequest) -> None:
        cfg = self.model.config
        req.params.validate(cfg.vocab_size)
        length = req.kv[0][0].shape[0] if req.kv else 0
        if length + req.params.max_tokens > cfg.max_position_embeddings:
            raise ValueError(f"request {req.id}: {length} prompt + {req.params.max_tokens} new tokens exceed the "
                             f"model's max_position_embeddings ({cfg.max_position_embeddings}); lower max_tokens")
        gen = req.generator
        if gen is None and req.params.temperature > 0:
            gen = make_generator(req.params.seed)
        a = _Active(req, list(req.kv), [req.first_token], gen)
        if req.params.logprobs is not None and req.first_logprobs is not None:
            a.logprobs.append(req.first_logprobs)
        self._check_done(a)
        self.waiting.append(a)

    def cancel(self, ids) -> list[DecodeResult]:
        """Drop these requests now (their cache is freed); returns what they had generated."""
        ids = set(ids)
        gone = [a for a in self.waiting + self.active if a.req.id in ids]
        self.waiting = [a for a in self.waiting if a.req.id not in ids]
        self.active = [a for a in self.active if a.req.id not in ids]
        return [DecodeResult(a.req.id, a.tokens, "cancelled", a.itl) for a in gone]

    def fail_active(self, msg: str) -> list[DecodeResult]:
        """The batched forward failed: end the requests it held (waiting ones keep going)."""
        gone, self.active = self.active, []
        return [DecodeResult(a.req.id, a.tokens, "error", a.itl, msg) for a in gone]

    def _check_done(self, a: _Active) -> None:
        p = a.req.params
        if p.eos_token_id is not None and a.tokens[-1] == p.eos_token_id:
            a.finish_reason = "stop"
        elif len(a.tokens) >= p.max_tokens:
            a.finish_reason = "length"

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def step(self) -> list[DecodeResult]:
        """Admit waiting requests up to max_batch, advance every active one by a token."""
        finished = [a for a in self.waiting if a.finish_reason]
        self.waiting = [a for a in self.waiting if not a.finish_reason]
        while self.waiting and len(self.active) < self.max_batch:
            self.active.append(self.waiting.pop(0))
        if self.active:
            self._forward(self.active)
            finished += [a for a in self.active if a.finish_reason]
            self.active = [a for a in self.active if not a.finish_reason]
        return [DecodeResult(a.req.id, a.tokens, a.finish_reason, a.itl, a.error) for a in finished]

    @torch.no_grad()
    def _forward(self, batch_reqs: list[_Active]) -> None:
        lens = [a.cache[0][0].shape[0] for a in batch_reqs]
        batch = PackedBatch.from_sequences([[a.tokens[-1]] for a in batch_reqs], self.device, lens)
        past = [_pack_layer([a.cache[i] for a in batch_reqs]) for i in range(self.model.config.num_layers)]
        batch.meta()
        t0 = time.perf_counter()
        out = self.model(batch, past)
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.steps += 1
        for j, a in enumerate(batch_reqs):
            a.cache = [(torch.cat([c[0], kv[0][j:j + 1]]), torch.cat([c[1], kv[1][j:j + 1]]))
                       for c, kv in zip(a.cache, out.kv)]
            a.itl.append(dt)
            try:  # one request's sampling failure ends that request, not the batch
                tok = sample(out.logits[j], a.req.params, a.gen)
                if a.req.params.logprobs is not None:
                    a.logprobs.append(token_logprobs(out.logits[j], tok, a.req.params.logprobs))
            except Exception as e:  # noqa: BLE001
                a.finish_reason, a.error = "error", f"sampling failed: {type(e).__name__}: {e}"
                continue
            a.tokens.append(tok)
            self._check_done(a)

    def run(self, reqs: list[DecodeRequest]) -> list[DecodeResult]:
        for r in reqs:
            self.add(r)
        results = []
        while self.has_work:
            results += self.step()
        return results
