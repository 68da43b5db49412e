"""Token sampling for a whole batch at once, on the logits' device.

Every row has its own parameters (greedy / temperature / top-k / top-p) and its own
random stream. Streams are counter-based: draw ``n`` of a request with seed ``s`` uses
noise ``hash(s, n, token)``, so a seeded request samples the same tokens whatever batch
it shares and on whichever device; nothing per request lives in a ``torch.Generator``,
and a step samples every row with a few batched kernels and no host sync (the engine
reads the tokens back once per step).

Sampling is Gumbel-max: ``argmax(log p + g)`` with ``g = -log(-log u)`` picks token i
with probability p_i exactly. Logits are shifted by their maximum and divided by the
temperature in float64, so a temperature or top_p as small as 1e-300 degenerates to
greedy, never to NaN.

Before sampling, the logits of a row may be processed as vLLM does (:class:`LogitsState`):
min_tokens masks the EOS token until that many tokens are out, logit_bias is added, then
the repetition penalty (over prompt and output: a positive logit divided by it, a negative
one multiplied), the frequency penalty (times each token's count in the output so far) and
the presence penalty (once per token present in the output) are applied. Greedy rows take
the argmax of the processed logits too; reported logprobs stay the model's raw ones.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    eos_token_id: int | None = None
    seed: int | None = None  # any 64-bit value, signed or not; None: fresh entropy per request
    logprobs: int | None = None  # also report the sampled token's logprob and the top-n alternatives
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # tokens in prompt or output: logit / r if positive, * r if not
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0  # EOS is masked until this many tokens are generated
    prompt_logprobs: int | None = None  # also report each prompt token's logprob and top-n (echo)

    @property
    def processed(self) -> bool:
        """Whether the logits need processing before sampling (see :class:`LogitsState`)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or (self.min_tokens and self.eos_token_id is not None))

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
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= vocab:
            raise ValueError(f"prompt_logprobs must lie in [0, {vocab}]")
        for name, lo, hi in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2),
                             ("repetition_penalty", 0, math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"{name} must be a finite number in [{lo}, {hi}]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or \
                not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be an integer in [0, max_tokens]")
        for t, b in (self.logit_bias or {}).items():
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"logit_bias: token id {t!r} must lie in [0, {vocab})")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias: the bias of token {t} must lie in [-100, 100]")


def _signed64(v: int) -> int:
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class SampleStream:
    """A request's random stream: its 64-bit seed and how many draws it has made."""

    seed: int  # as a signed 64-bit value
    draws: int = 0


def make_stream(seed: int | None) -> SampleStream:
    """A request's stream from its seed (any 64-bit value), else from fresh OS entropy."""
    return SampleStream(_signed64(secrets.randbits(64) if seed is None else seed))


# splitmix64's finaliser, on int64 tensors (multiplication wraps; the masks make the
# arithmetic right shifts logical).
_M1, _M2, _GOLDEN = _signed64(0xBF58476D1CE4E5B9), _signed64(0x94D049BB133111EB), _signed64(0x9E3779B97F4A7C15)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_noise(seeds: torch.Tensor, draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float64 uniforms in (0, 1), a pure function of (seed, draw, token)."""
    row = _mix(seeds * _GOLDEN + draws)  # one key per (request, draw)
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix(row[:, None] ^ _mix(cols + _GOLDEN)[None, :])
    return (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0 ** -53


class LogitsState:
    """Per-row logits processing on the device: penalties, logit_bias and min_tokens.

    One row per decode slot (or per request), written once when a request is admitted
    (:meth:`set_row`); a step processes a batch of rows with a few batched kernels
    (:meth:`apply`) and counts the tokens it sampled (:meth:`record`), with no host sync
    and no per-row Python work. Default rows are an exact identity (bias 0, penalties 0 and
    1, nothing masked), so one step can mix processed and plain requests."""

    def __init__(self, rows: int, vocab: int, device):
        self.counts = torch.zeros(rows, vocab, dtype=torch.float32, device=device)  # output tokens so far
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)  # in the prompt
        self.bias = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self.coef = torch.zeros(rows, 4, dtype=torch.float32, device=device)  # presence, frequency, repetition, min
        self.coef[:, 2] = 1.0
        self.eos = torch.zeros(rows, dtype=torch.int64, device=device)  # masked while ngen < min_tokens
        self.ngen = torch.zeros(rows, dtype=torch.float32, device=device)

    def set_row(self, row: int, p: SamplingParams, prompt: list[int] | None, output: list[int]) -> None:
        """(Re)write a row for request ``p`` whose ``output`` tokens are already out."""
        dev, V = self.counts.device, self.counts.shape[1]
        put = lambda v, dt: torch.tensor(v, dtype=dt).to(dev, non_blocking=True)  # noqa: E731
        self.counts[row] = torch.bincount(put(output, torch.int64), minlength=V).float() if output else 0
        self.seen[row] = False
        if p.repetition_penalty != 1.0 and prompt:
            self.seen[row, put(prompt, torch.int64)] = True
        self.bias[row] = 0
        if p.logit_bias:
            self.bias[row, put(list(p.logit_bias), torch.int64)] = put(list(p.logit_bias.values()), torch.float32)
        mt = p.min_tokens if p.eos_token_id is not None else 0
        self.coef[row] = put([p.presence_penalty, p.frequency_penalty, p.repetition_penalty, mt], torch.float32)
        self.eos[row] = p.eos_token_id or 0
        self.ngen[row] = len(output)

    def apply(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Processed float32 logits [B, vocab] of ``logits`` whose rows are ``rows`` [B]."""
        x = logits.float()
        coef = self.coef[rows]
        counts = self.counts[rows]
        ban = (self.ngen[rows] < coef[:, 3])[:, None]  # min_tokens not reached: no EOS yet
        eos = torch.zeros_like(x, dtype=torch.bool).scatter_(1, self.eos[rows][:, None], ban)
        x = x.masked_fill(eos, float("-inf")) + self.bias[rows]
        rep = torch.where(self.seen[rows] | (counts > 0), coef[:, 2:3], 1.0)
        x = torch.where(x > 0, x / rep, x * rep)
        return x - coef[:, 1:2] * counts - coef[:, 0:1] * (counts > 0)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's newly sampled token."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
        self.ngen.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))


def process_logits(logits: torch.Tensor, p: SamplingParams, prompt: list[int] | None,
                   output: list[int]) -> torch.Tensor:
    """One request's processed logits [vocab] (its first token: sampled from the prefill's)."""
    if not p.processed:
        return logits
    st = LogitsState(1, logits.shape[-1], logits.device)
    st.set_row(0, p, prompt, output)
    return st.apply(logits[None], torch.zeros(1, dtype=torch.int64, device=logits.device))[0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], streams: list[SampleStream | None]
                 ) -> torch.Tensor:
    """One token per row of ``logits`` [B, vocab] -> [B] int64 on the logits' device.

    Advances the stream of every row that sampled (temperature > 0). No host sync."""
    dev = logits.device
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return logits.float().argmax(-1)
    host = torch.tensor([[params[i].temperature, params[i].top_p, params[i].top_k] for i in rows],
                        dtype=torch.float64)
    streams = [s if s is not None or p.temperature == 0 else make_stream(None) for s, p in zip(streams, params)]
    keys = torch.tensor([[streams[i].seed, streams[i].draws] for i in rows], dtype=torch.int64)
    for i in rows:
        streams[i].draws += 1
    idx = torch.tensor(rows).to(dev, non_blocking=True)  # not torch.tensor(..., device=): that copy syncs the host
    host, keys = host.to(dev, non_blocking=True), keys.to(dev, non_blocking=True)
    drawn = sample_rows(logits[idx], host, keys, any(params[i].top_k or params[i].top_p < 1 for i in rows))
    return logits.float().argmax(-1).index_copy(0, idx, drawn)


def sample_rows(logits: torch.Tensor, params: torch.Tensor, keys: torch.Tensor, filtered: bool = True
                ) -> torch.Tensor:
    """One token per row from row-parameter tensors on the device: ``params`` [B, 3] float64
    (temperature, 0: greedy; top_p; top_k, 0: off) and ``keys`` [B, 2] int64 (seed, draw).
    ``filtered``: some row may use top-k / top-p (False skips the sort). No host sync."""
    x = logits.float()
    greedy_tok = x.argmax(-1)
    temp = params[:, 0:1]
    xs = x.double()
    finite = torch.isfinite(xs).any(-1)
    xs = (xs - xs.max(-1, keepdim=True).values) / torch.where(temp > 0, temp, 1.0)
    if filtered:
        xs = _top_k_top_p(xs, params[:, 2:3].long(), params[:, 1:2])
    logp = torch.log_softmax(xs, dim=-1)
    u = uniform_noise(keys[:, 0], keys[:, 1], x.shape[-1])
    drawn = torch.argmax(logp - torch.log(-torch.log(u)), dim=-1)
    # Greedy rows, and a row with no finite logit (nothing to sample from), take the argmax.
    return torch.where(finite & (temp[:, 0] > 0), drawn, greedy_tok)


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k (0: off) and top-p (1: off) leave out, per row."""
    srt, order = torch.sort(x, dim=-1, descending=True)
    ranks = torch.arange(x.shape[-1], device=x.device)[None, :]
    keep = (top_k == 0) | (ranks < top_k)
    probs = torch.softmax(srt.masked_fill(~keep, float("-inf")), dim=-1)
    # The smallest prefix whose mass reaches top_p; the top token always stays (a top_p below
    # float resolution keeps exactly one).
    keep &= (probs.cumsum(-1) - probs < top_p) | (ranks == 0)
    return x.masked_fill(~torch.zeros_like(keep).scatter(1, order, keep), float("-inf"))


def sample(logits: torch.Tensor, p: SamplingParams, stream: SampleStream | None) -> int:
    """One token from logits [vocab] (one row of :func:`sample_batch`)."""
    return int(sample_batch(logits[None], [p], [stream])[0])


def batch_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-logit log-probabilities (before temperature / top-k / top-p, as OpenAI reports
    them): of each row's ``tokens``, and each row's ``top_n`` best (ids, values)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, top_n, dim=-1)
    return lp.gather(1, tokens[:, None])[:, 0], top.indices, top.values


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` and its ``top_n`` most likely tokens."""
    lp, ids, vals = batch_logprobs(logits[None], torch.tensor([token], device=logits.device), top_n)
    return float(lp[0]), list(zip(ids[0].tolist(), vals[0].tolist()))
