"""Single-rank prefill engine: a token-budgeted scheduler over one model.

Requests are packed into steps of at most ``max_num_tokens`` new tokens (MNT);
prompts longer than what is left of a step are split into chunks that continue from
their cached prefix in later steps (chunked prefill). Each finished request yields its
next token, last-token logits and the KV cache its prompt produced: what a prefill
server hands to decode. Under DWDP every rank runs one of these on its own requests.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .batch import PackedBatch
from .models.transformer import LayerKV, MoECausalLM


@dataclass
class Request:
    id: int | str
    prompt: list[int]
    arrival: float = 0.0  # seconds after the run starts (offline: 0)


@dataclass
class RequestResult:
    id: int | str
    prompt_len: int
    next_token: int
    logits: torch.Tensor  # [vocab] fp32
    kv: list[LayerKV]  # per layer, this request's whole prompt
    ttft: float  # seconds from arrival to the end of its last prefill step


@dataclass
class StepRecord:
    num_tokens: int
    num_seqs: int
    seconds: float


@dataclass
class _Running:
    req: Request
    done: int = 0  # prompt tokens already prefilled
    kv_chunks: list[list[LayerKV]] = field(default_factory=list)

    def cached(self) -> list[LayerKV] | None:
        if not self.kv_chunks:
            return None
        if len(self.kv_chunks) == 1:
            return self.kv_chunks[0]
        return [(torch.cat([c[i][0] for c in self.kv_chunks]), torch.cat([c[i][1] for c in self.kv_chunks]))
                for i in range(len(self.kv_chunks[0]))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PrefillEngine:
    """One rank's prefill scheduler: a FIFO of admitted requests, stepped under an MNT budget.

    Drive it with :meth:`run` (a rank on its own: DP, DWDP) or :func:`run_lockstep`
    (ranks whose steps must line up: expert parallelism), or step by step with
    :meth:`submit` / :meth:`step`.
    """

    def __init__(self, model: MoECausalLM, max_num_tokens: int = 8192, keep_kv: bool = True):
        if max_num_tokens < 1:
            raise ValueError("max_num_tokens must be at least 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.max_num_tokens = max_num_tokens
        self.keep_kv = keep_kv
        self.steps: list[StepRecord] = []
        self.queue: deque[_Running] = deque()

    def validate(self, req: Request) -> None:
        limit = self.model.config.max_position_embeddings
        if not req.prompt:
            raise ValueError(f"request {req.id}: empty prompt")
        if len(req.prompt) > limit:
            raise ValueError(
                f"request {req.id}: prompt of {len(req.prompt)} tokens is longer than the model allows "
                f"({limit}, max_position_embeddings)"
            )
        vocab = self.model.config.vocab_size
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise ValueError(f"request {req.id}: token ids must lie in [0, {vocab})")

    def submit(self, req: Request) -> None:
        self.validate(req)
        self.queue.append(_Running(req))

    @property
    def has_work(self) -> bool:
        return bool(self.queue)

    def plan_step(self, queue: deque[_Running]) -> list[tuple[_Running, int]]:
        """Take up to MNT tokens from the head of the queue, splitting the last prompt."""
        budget, plan = self.max_num_tokens, []
        for run in queue:
            if budget == 0:
                break
            n = min(len(run.req.prompt) - run.done, budget)
            plan.append((run, n))
            budget -= n
        return plan

    def run_step(self, plan: list[tuple[_Running, int]]) -> list[_Running]:
        """One forward over the planned chunks; returns the requests it finished."""
        seqs = [run.req.prompt[run.done:run.done + n] for run, n in plan]
        prefix = [run.done for run, _ in plan]
        batch = PackedBatch.from_sequences(seqs, self.device, prefix)
        past = None
        if any(prefix):
            caches = [run.cached() for run, _ in plan]
            past = [_pack_layer([c[i] if c else None for c in caches])
                    for i in range(self.model.config.num_layers)]
        batch.meta()  # step metadata to the device now, not inside the timed forward
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(batch, past)
        _sync(self.device)
        self.steps.append(StepRecord(batch.num_tokens, batch.num_seqs, time.perf_counter() - t0))
        finished = []
        cu = batch.cu_q
        for j, (run, n) in enumerate(plan):
            if self.keep_kv or run.done + n < len(run.req.prompt):
                run.kv_chunks.append([(a[cu[j]:cu[j + 1]], b[cu[j]:cu[j + 1]]) for a, b in out.kv])
            run.done += n
            if run.done == len(run.req.prompt):
                run.logits = out.logits[j]
                finished.append(run)
        return finished

    def step(self, now) -> list[RequestResult]:
        """Run one step over the queue; ``now()`` gives the run clock for TTFTs."""
        plan = self.plan_step(self.queue)
        results = []
        for run in self.run_step(plan):
            self.queue.remove(run)
            results.append(RequestResult(run.req.id, len(run.req.prompt), int(run.logits.argmax()), run.logits,
                                         run.cached() if self.keep_kv else [], now() - run.req.arrival))
        return results

    def dummy_step(self) -> None:
        """A one-token forward whose output is dropped: what an idle rank runs so that the
        collectives of a lockstep group (expert parallelism) line up."""
        batch = PackedBatch.from_sequences([[0]], self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        self.model(batch)
        _sync(self.device)
        self.steps.append(StepRecord(0, 0, time.perf_counter() - t0))

    def run(self, requests: list[Request], progress: bool = False) -> list[RequestResult]:
        """Offline or timed arrivals: requests join the queue at their arrival time."""
        for r in requests:
            self.validate(r)
        pending = deque(sorted(requests, key=lambda r: r.arrival))
        results: list[RequestResult] = []
        bar = _bar(progress, sum(len(r.prompt) for r in requests))
        start = time.perf_counter()
        clock = lambda: time.perf_counter() - start  # noqa: E731
        while pending or self.queue:
            now = clock()
            while pending and pending[0].arrival <= now:
                self.submit(pending.popleft())
            if not self.queue:
                time.sleep(max(0.0, pending[0].arrival - now))
                continue
            results += self.step(clock)
            if bar:
                bar.update(self.steps[-1].num_tokens)
        if bar:
            bar.close()
        return results


def run_lockstep(engine: PrefillEngine, requests: list[Request], any_rank, progress: bool = False,
                 idle_poll_s: float = 0.0005) -> list[RequestResult]:
    """Like :meth:`PrefillEngine.run`, for a group whose ranks must step together.

    ``any_rank(flags) -> flags`` ORs a few booleans over the group (one small all-reduce).
    Each round every rank reports whether it has work and whether arrivals are still to
    come; while any rank has work, all step, idle ones with :meth:`~PrefillEngine.dummy_step`.
    """
    for r in requests:
        engine.validate(r)
    pending = deque(sorted(requests, key=lambda r: r.arrival))
    results: list[RequestResult] = []
    bar = _bar(progress, sum(len(r.prompt) for r in requests))
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    while True:
        now = clock()
        while pending and pending[0].arrival <= now:
            engine.submit(pending.popleft())
        someone_busy, more_coming = any_rank([engine.has_work, bool(pending)])
        if not someone_busy:
            if not more_coming:
                break
            time.sleep(min(idle_poll_s, max(0.0, pending[0].arrival - now)) if pending else idle_poll_s)
            continue
        if engine.has_work:
            results += engine.step(clock)
            if bar:
                bar.update(engine.steps[-1].num_tokens)
        else:
            engine.dummy_step()
    if bar:
        bar.close()
    return results


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="prefill")


def _pack_layer(per_seq: list[LayerKV | None]) -> LayerKV:
    """Concatenate the sequences' cached prefixes of one layer (empty for fresh ones)."""
    ref = next((kv for kv in per_seq if kv is not None), None)
    a = [kv[0] if kv is not None else ref[0][:0] for kv in per_seq]
    b = [kv[1] if kv is not None else ref[1][:0] for kv in per_seq]
    return torch.cat(a), torch.cat(b)
