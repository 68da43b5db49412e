"""Decode: generate from a prefill's KV cache, continuously batched.

A decode worker takes each request's prompt KV cache and first token (what a prefill
worker hands over) and steps every running request together, one new token each per
step, until EOS or the request's token limit. Requests join and leave between steps.

- The KV cache is allocated once (:class:`~dwdp.kv_cache.SlotKVCache`, a fixed slot per
  running request); an admitted prompt is copied into its slot and every step writes its
  new keys and values in place (no per-step concatenation).
- Sampling is batched on the device (:mod:`dwdp.sampling`); the step reads the new tokens
  back with one host sync. Each slot's sampling parameters and random stream (seed, draws)
  live in device tensors written at admission: a step gathers its rows' by slot and
  advances their draws on the device, with no per-row work on the host. Penalties,
  logit_bias and min_tokens keep per-slot state on the device too
  (:class:`~dwdp.sampling.LogitsState`, allocated when the first request that needs it
  arrives), written once at admission and updated by each step.
- Steps overlap with the host's bookkeeping (as SGLang's overlap scheduler and vLLM's async
  scheduling do): each step's input tokens are read on the device from the previous step's
  samples (one last token per cache slot), so step k+1 is launched before step k's tokens
  reach the host, and the host appends them, checks stops and streams them while the GPU
  runs. A request that hits EOS is known one step late: it rides in one more step, whose
  token is dropped (its slot is freed after that step). Off in lockstep (expert-parallel)
  decode, where every step already waits for the group.
- On CUDA with a replicated model the step is captured in a CUDA graph per batch-size
  bucket (1, 2, 4, ..., max_batch) and replayed: a decode step is hundreds of small
  kernels, so launching them one by one costs more than they take.

Decode runs on replicated or expert-parallel workers, not DWDP: a decode step is far too
short to hide a whole layer's pull.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .kv_cache import SlotKVCache
from .memory import cache_bytes_per_token
from .models.transformer import LayerKV, MoECausalLM
from .sampling import LogitsState, SampleStream, SamplingParams, batch_logprobs, make_stream, sample_rows

DEFAULT_MAX_CONTEXT = 4096  # tokens per cache slot unless the caller sizes it


@dataclass
class DecodeRequest:
    id: int | str
    kv: list[LayerKV]  # per layer, the prompt's cache (released once copied into a slot)
    first_token: int  # sampled from the prefill's last logits
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_len: int = 0
    stream: SampleStream | None = None  # the request's sampling stream (default: from its seed)
    first_logprobs: tuple | None = None  # (logprob, top-n) of first_token, when params.logprobs is set
    prompt: list[int] | None = None  # the prompt's token ids: what params.repetition_penalty looks at


@dataclass
class _Active:
    req: DecodeRequest
    tokens: list[int]
    stream: SampleStream | None
    slot: int = -1  # cache slot, once admitted
    length: int = 0  # tokens in the cache: the next token's position
    itl: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # per token, when params.logprobs is set
    error: str | None = None  # finish_reason "error": why this request (alone) failed
    pending: int = 0  # tokens launched in a step whose results the host has not read yet


@dataclass
class _InFlight:
    """A launched step: its rows, where its tokens (and logprobs) land on the host, and the
    event that says they have."""
    batch: list[_Active]
    tokens: torch.Tensor
    logprobs: tuple | None
    done: torch.cuda.Event | None
    t0: float


@dataclass
class DecodeResult:
    id: int | str
    tokens: list[int]  # generated tokens, the first one (from prefill) included
    finish_reason: str  # "stop" (EOS), "length", "cancelled" or "error"
    itl: list[float]  # seconds between consecutive tokens
    error: str | None = None


def _graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a captured graph: 1, 2, 4, 8, 16, then every 16, and max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeEngine:
    def __init__(self, model: MoECausalLM, max_batch: int = 64, max_context: int | None = None,
                 cuda_graphs: bool | None = None, lockstep=None, overlap: bool | None = None):
        """``max_context``: tokens per request (prompt + generated) the cache holds, default
        min(model context, 4096). ``cuda_graphs``: None = on where the step allows it (CUDA,
        Triton, routed experts all local). ``lockstep``: for a model whose MoE layers are
        collectives (expert parallelism, :func:`~dwdp.parallel.ep.apply_dep`), a function
        that ORs flags over the group (:func:`~dwdp.parallel.group.lockstep_sync`): a rank
        with nothing to decode runs a one-row dummy step while any peer decodes. ``overlap``:
        launch each step before reading the previous one's tokens (default: on unless
        ``lockstep``)."""
        cfg = model.config
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_context = max_context or min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        dtype = model.model.embed_tokens.weight.dtype
        need = (max_batch + 1) * self.max_context * cache_bytes_per_token(cfg, dtype)
        if self.device.type == "cuda" and need > torch.cuda.mem_get_info(self.device)[0]:
            raise ValueError(f"the decode KV cache ({max_batch} requests x {self.max_context} tokens = "
                             f"{need / 2**30:.1f} GiB) does not fit the free GPU memory "
                             f"({torch.cuda.mem_get_info(self.device)[0] / 2**30:.1f} GiB); lower --max-batch or "
                             "--max-context")
        # One slot per running request, plus a scratch slot that padding rows write to.
        self.cache = SlotKVCache(cfg, max_batch + 1, self.max_context, dtype, self.device)
        self._scratch = max_batch
        self._free = list(range(max_batch - 1, -1, -1))
        self.waiting: list[_Active] = []
        self.active: list[_Active] = []
        self.steps = 0
        self.dummy_steps = 0
        self.lockstep = lockstep
        self.use_graphs = self._graphs_apply() if cuda_graphs is None else cuda_graphs
        if self.use_graphs and not self._graphs_apply():
            raise ValueError("CUDA graphs need a CUDA model with Triton and all routed experts local (a replica)")
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._static = torch.zeros(3, max_batch, dtype=torch.int64, device=self.device)  # token, position, slot
        self._pool = None
        self.overlap = lockstep is None if overlap is None else overlap
        if self.overlap and lockstep is not None:
            raise ValueError("overlapped steps need a decode engine of its own (no lockstep group)")
        # Each slot's last token on the device: a step's inputs, written by the step before.
        self._last_tok = torch.zeros(max_batch + 1, dtype=torch.int64, device=self.device)
        self._inflight: _InFlight | None = None
        self._draining: list[_Active] = []  # finished or cancelled, their slot still in the in-flight step
        self._last_read = 0.0
        self._proc: LogitsState | None = None  # per-slot logits processing, once a request needs it
        self._n_proc = 0  # admitted requests whose logits are processed
        # Per slot: (temperature, top_p, top_k) and the random stream's (seed, draws).
        self._samp = torch.zeros(max_batch + 1, 3, dtype=torch.float64, device=self.device)
        self._keys = torch.zeros(max_batch + 1, 2, dtype=torch.int64, device=self.device)
        self._n_sampled = 0  # admitted requests with temperature > 0
        self._n_filtered = 0  # ... of which with top-k or top-p

    def _graphs_apply(self) -> bool:
        """The step must be free of host syncs: the attention kernel applies to the model's
        head dims and every MoE layer's routed experts are all local."""
        from .models.attention import decode_kernel_applies
        from .models.moe import RoutedExperts

        cfg, param = self.model.config, self.model.model.embed_tokens.weight
        dk, dv = ((cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank) if cfg.is_mla
                  else (cfg.head_dim, cfg.head_dim))
        return decode_kernel_applies(param, dk, dv, cfg.is_mla) and all(
            type(b.experts) is RoutedExperts and len(b.experts.expert_range) == b.experts.num_experts
            for b in self.model.moe_blocks())

    def add(self, req: DecodeRequest) -> None:
        cfg = self.model.config
        req.params.validate(cfg.vocab_size)
        length = req.kv[0][0].shape[0] if req.kv else 0
        if length + req.params.max_tokens > cfg.max_position_embeddings:
            raise ValueError(f"request {req.id}: {length} prompt + {req.params.max_tokens} new tokens exceed the "
                             f"model's max_position_embeddings ({cfg.max_position_embeddings}); lower max_tokens")
        if length + req.params.max_tokens > self.max_context:
            raise ValueError(f"request {req.id}: {length} prompt + {req.params.max_tokens} new tokens exceed the "
                             f"decode cache's {self.max_context} tokens per request; raise max_context "
                             f"(dwdp serve --max-context) or lower max_tokens")
        stream = req.stream
        if stream is None and req.params.temperature > 0:
            stream = make_stream(req.params.seed)
        a = _Active(req, [req.first_token], stream)
        if req.params.logprobs is not None and req.first_logprobs is not None:
            a.logprobs.append(req.first_logprobs)
        self._check_done(a)
        self.waiting.append(a)

    def _release(self, a: _Active) -> None:
        if a.slot >= 0:
            p = a.req.params
            self._n_proc -= p.processed
            self._n_sampled -= p.temperature > 0
            self._n_filtered -= p.temperature > 0 and (p.top_k > 0 or p.top_p < 1)
            self._free.append(a.slot)
            a.slot = -1

    def cancel(self, ids) -> list[DecodeResult]:
        """Drop these requests now (their slot is freed); returns what they had generated."""
        ids = set(ids)
        gone = [a for a in self.waiting + self.active if a.req.id in ids]
        self.waiting = [a for a in self.waiting if a.req.id not in ids]
        self.active = [a for a in self.active if a.req.id not in ids]
        for a in gone:
            a.finish_reason = "cancelled"  # a step still in flight drops its token
            self._finish(a)
        return [DecodeResult(a.req.id, a.tokens, "cancelled", a.itl) for a in gone]

    def _finish(self, a: _Active) -> None:
        """Free a finished request's slot, or once the step in flight that still writes it is read."""
        if a.pending:
            self._draining.append(a)
        else:
            self._release(a)

    def fail_active(self, msg: str) -> list[DecodeResult]:
        """The batched forward failed: end the requests it held (waiting ones keep going)."""
        gone, self.active = self.active, []
        self._inflight = None
        for a in gone + self._draining:
            a.pending = 0
            self._release(a)
        self._draining = []
        return [DecodeResult(a.req.id, a.tokens, "error", a.itl, msg) for a in gone]

    def _check_done(self, a: _Active) -> None:
        p = a.req.params
        if p.eos_token_id is not None and a.tokens[-1] == p.eos_token_id:
            a.finish_reason = "stop"
        elif len(a.tokens) >= p.max_tokens:
            a.finish_reason = "length"

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self._inflight)

    def step(self) -> list[DecodeResult]:
        """Admit waiting requests into free slots, advance every active one by a token. With
        ``overlap`` the step launched here is read by the next call: what this one returns
        and appends comes from the step before."""
        finished = [a for a in self.waiting if a.finish_reason]
        self.waiting = [a for a in self.waiting if not a.finish_reason]
        admitted = []
        while self.waiting and self._free:
            a = self.waiting.pop(0)
            a.slot = self._free.pop()
            self.active.append(a)  # at once: a failure below then fails (and frees) it with the rest
            a.length = self.cache.write_prompt(a.slot, a.req.kv)
            a.req.kv = []  # the slot holds it now
            admitted.append(a)
        if admitted:
            self._set_last_tokens(admitted)
            self._set_processing(admitted)
        if self.lockstep is not None and not self.active and self.lockstep([False])[0]:
            self._dummy_step()  # a peer decodes: its MoE collectives need this rank too
        elif self.active or self._inflight:
            if self.lockstep is not None:
                self.lockstep([True])
            # Rows that may still need a token: not stopped, not at their limit once the step in flight is read.
            batch = [a for a in self.active if not a.finish_reason and len(a.tokens) + a.pending < a.req.params.max_tokens]
            launched = self._launch(batch) if batch else None
            if self.overlap:
                previous, self._inflight = self._inflight, launched
            else:
                previous = launched
            if previous is not None:
                self._read(previous)
            finished += [a for a in self.active if a.finish_reason]
            self.active = [a for a in self.active if not a.finish_reason]
        for a in finished:
            self._finish(a)
        for a in [a for a in self._draining if not a.pending]:
            self._draining.remove(a)
            self._release(a)
        return [DecodeResult(a.req.id, a.tokens, a.finish_reason, a.itl, a.error) for a in finished]

    def _set_last_tokens(self, admitted: list[_Active]) -> None:
        """The admitted slots' last tokens, sampling parameters and streams, in one copy each."""
        slots = torch.tensor([a.slot for a in admitted], dtype=torch.int64).to(self.device, non_blocking=True)
        toks = torch.tensor([a.tokens[-1] for a in admitted], dtype=torch.int64)
        self._last_tok.index_copy_(0, slots, toks.to(self.device, non_blocking=True))
        ps = [a.req.params for a in admitted]
        samp = torch.tensor([[p.temperature, p.top_p, p.top_k] for p in ps], dtype=torch.float64)
        keys = torch.tensor([[a.stream.seed, a.stream.draws] if a.stream is not None else [0, 0] for a in admitted],
                            dtype=torch.int64)
        self._samp.index_copy_(0, slots, samp.to(self.device, non_blocking=True))
        self._keys.index_copy_(0, slots, keys.to(self.device, non_blocking=True))
        self._n_sampled += sum(p.temperature > 0 for p in ps)
        self._n_filtered += sum(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in ps)

    def _set_processing(self, admitted: list[_Active]) -> None:
        """Write the admitted slots' rows of the logits processing state (every admitted slot
        once the state exists: a slot keeps no state of its previous request)."""
        if self._proc is None and not any(a.req.params.processed for a in admitted):
            return
        if self._proc is None:
            self._proc = LogitsState(self.max_batch + 1, self.model.config.vocab_size, self.device)
        for a in admitted:
            self._proc.set_row(a.slot, a.req.params, a.req.prompt, a.tokens)
            self._n_proc += a.req.params.processed

    def _logits(self, batch: list[_Active]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's logits [B, vocab] and its rows' slots, on the device."""
        B = len(batch)
        bucket = next(b for b in _graph_buckets(self.max_batch) if b >= B) if self.use_graphs else B
        # position, slot per row; rows past B pad a graph bucket (scratch slot, position 0). The
        # tokens are each slot's last one, on the device (the previous step wrote them).
        host = torch.tensor([[0] * bucket, [self._scratch] * bucket], dtype=torch.int64)
        host[:, :B] = torch.tensor([[a.length for a in batch], [a.slot for a in batch]], dtype=torch.int64)
        if not self.use_graphs:
            pos, slots = host.to(self.device, non_blocking=True)
            return self.model.decode(self._last_tok[slots], pos, slots, self.cache.layers,
                                     max(a.length for a in batch) + 1), slots
        if bucket not in self._graphs:
            self._capture(bucket)
        self._static[1:, :bucket].copy_(host, non_blocking=True)
        self._static[0, :bucket] = self._last_tok[self._static[2, :bucket]]
        graph, out = self._graphs[bucket]
        graph.replay()
        return out[:B], self._static[2, :B]

    def _capture(self, b: int) -> None:
        tok, pos, slot = self._static[0, :b], self._static[1, :b], self._static[2, :b]
        self._static[:2, :b] = 0  # warm-up and capture write the scratch slot only
        self._static[2, :b] = self._scratch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile Triton kernels, settle the allocator
                self.model.decode(tok, pos, slot, self.cache.layers)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model.decode(tok, pos, slot, self.cache.layers)
        self._graphs[b] = (graph, out)

    def capture_graphs(self) -> None:
        """Capture every bucket now (largest first, so smaller ones reuse its memory)."""
        for b in sorted(_graph_buckets(self.max_batch), reverse=True):
            if self.use_graphs and b not in self._graphs:
                self._capture(b)

    @torch.inference_mode()
    def _launch(self, batch: list[_Active]) -> _InFlight:
        """Run one step for ``batch`` on the device, up to its sampled tokens (kept as each
        slot's last token for the next step, and copied towards the host): no host sync."""
        t0 = time.perf_counter()
        logits, slots = self._logits(batch)
        for a in batch:
            a.length += 1
            a.pending += 1
        if self._n_proc:
            logits_p = self._proc.apply(logits, slots)
        else:
            logits_p = logits
        if self._n_sampled:
            samp = self._samp[slots]
            tokens = sample_rows(logits_p, samp, self._keys[slots], self._n_filtered > 0)
            self._keys[:, 1].index_add_(0, slots, (samp[:, 0] > 0).long())  # the sampled rows' next draw
        else:
            tokens = logits_p.argmax(-1)
        if self._n_proc:
            self._proc.record(slots, tokens)
        self._last_tok.index_copy_(0, slots, tokens)
        want = [a.req.params.logprobs for a in batch if a.req.params.logprobs is not None]
        lp = batch_logprobs(logits, tokens, max(want)) if want else None
        self.steps += 1
        if self.device.type != "cuda":
            return _InFlight(batch, tokens, lp, None, t0)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in (tokens, *(lp or ()))]
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))  # the engine's device, whatever the thread's current one
        return _InFlight(batch, host[0], tuple(host[1:]) if lp is not None else None, done, t0)

    def _read(self, f: _InFlight) -> None:
        """Wait for a launched step's tokens and append them (the step's one host sync). A row
        that stopped or was cancelled since its launch drops its token."""
        if f.done is not None:
            f.done.synchronize()
        toks = f.tokens.tolist()
        lp = tuple(t.tolist() for t in f.logprobs) if f.logprobs is not None else None
        now = time.perf_counter()
        dt, self._last_read = now - max(f.t0, self._last_read), now
        for j, a in enumerate(f.batch):
            a.pending -= 1
            if a.finish_reason:
                continue
            a.itl.append(dt)
            a.tokens.append(toks[j])
            n = a.req.params.logprobs
            if n is not None:
                a.logprobs.append((lp[0][j], list(zip(lp[1][j][:n], lp[2][j][:n]))))
            self._check_done(a)

    @torch.inference_mode()
    def _dummy_step(self) -> None:
        z = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.model.decode(z, z, torch.full_like(z, self._scratch), self.cache.layers, 1)
        self.dummy_steps += 1

    def run(self, reqs: list[DecodeRequest]) -> list[DecodeResult]:
        """Decode ``reqs`` to the end (in lockstep: until every rank's requests are done)."""
        for r in reqs:
            self.add(r)
        results = []
        while self.lockstep([self.has_work])[0] if self.lockstep is not None else self.has_work:
            results += self.step()
        return results
