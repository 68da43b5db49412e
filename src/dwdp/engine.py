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
from typing import Callable, Protocol

import torch

from .batch import PackedBatch
from .models.transformer import LayerKV, MoECausalLM


@dataclass
class Request:
    id: int | str
    prompt: list[int]
    arrival: float = 0.0  # seconds after the run starts (offline: 0)
    prompt_logprobs: int | None = None  # also return each prompt token's logprob and top-n


@dataclass
class RequestResult:
    id: int | str
    prompt_len: int
    next_token: int
    logits: torch.Tensor  # [vocab] fp32
    kv: list[LayerKV]  # per layer, this request's whole prompt
    ttft: float  # seconds from arrival to the end of its last prefill step
    # Per prompt token, (logprob, [(id, logprob)] top-n) under the model's raw logits; None
    # for the first token (nothing predicts it). Only when the request asked.
    prompt_logprobs: list | None = None


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
    prompt_logprobs: list | None = None

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


def _tokens_left(queue) -> int:
    """Prompt tokens of ``queue`` not prefilled yet."""
    return sum(len(run.req.prompt) - run.done for run in queue)


def step_budget(left: int, max_num_tokens: int, balance: bool) -> int:
    """Tokens the next step may take: MNT, or with ``balance`` an equal share of the
    ``left`` tokens over the fewest MNT-sized steps that hold them."""
    if not balance or left <= max_num_tokens:
        return max_num_tokens
    steps = -(-left // max_num_tokens)
    return -(-left // steps)


def take_chunks(remaining: list[int], max_num_tokens: int, balance: bool = False) -> list[int]:
    """The scheduler's packing rule, on numbers alone (the engine and the planner both use
    it): FIFO over requests with ``remaining`` prompt tokens each, up to the step budget
    (:func:`step_budget`), the last request taken split (chunked prefill). Returns the
    tokens taken from each of the first requests."""
    budget, takes = step_budget(sum(remaining), max_num_tokens, balance), []
    for left in remaining:
        if budget == 0:
            break
        takes.append(min(left, budget))
        budget -= takes[-1]
    return takes


class PrefillEngine:
    """One rank's prefill scheduler: a FIFO of admitted requests, stepped under an MNT budget.

    Drive it with a :class:`StepDriver` (:meth:`run` is the shortcut for a list of
    requests on a rank of its own).
    """

    def __init__(self, model: MoECausalLM, max_num_tokens: int = 8192, keep_kv: bool = True,
                 balance_tail: bool = False):
        """``balance_tail``: once no more requests are coming, split what is left into
        equal steps (17K tokens at MNT 16K: two of 8.5K, not 16K + 1K). A DWDP step pulls
        the same experts whatever its size, so a short last step cannot hide its pulls;
        equal steps can."""
        if max_num_tokens < 1:
            raise ValueError("max_num_tokens must be at least 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.max_num_tokens = max_num_tokens
        self.keep_kv = keep_kv
        self.balance_tail = balance_tail
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

    def plan_step(self, queue: deque[_Running], final: bool = False) -> list[tuple[_Running, int]]:
        """Take up to MNT tokens from the head of the queue, splitting the last prompt
        (``final``, with ``balance_tail``: an equal share of what is left, see __init__)."""
        takes = take_chunks([len(run.req.prompt) - run.done for run in queue], self.max_num_tokens,
                            final and self.balance_tail)
        return list(zip(queue, takes))

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
        want = [j for j, (run, _) in enumerate(plan) if run.req.prompt_logprobs is not None]
        cu = batch.cu_q
        at = torch.cat([torch.arange(cu[j], cu[j + 1]) for j in want]).to(self.device) if want else None
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(batch, past, at) if want else self.model(batch, past)
        _sync(self.device)
        self.steps.append(StepRecord(batch.num_tokens, batch.num_seqs, time.perf_counter() - t0))
        if want:
            self._prompt_logprobs(plan, want, cu, out.token_logits)
        finished = []
        for j, (run, n) in enumerate(plan):
            if self.keep_kv or run.done + n < len(run.req.prompt):
                run.kv_chunks.append([(a[cu[j]:cu[j + 1]], b[cu[j]:cu[j + 1]]) for a, b in out.kv])
            run.done += n
            if run.done == len(run.req.prompt):
                run.logits = out.logits[j]
                finished.append(run)
        return finished

    @staticmethod
    def _prompt_logprobs(plan, want: list[int], cu, logits: torch.Tensor) -> None:
        """Append the logprobs of the prompt tokens this step's logits predict: a chunk's
        token i predicts prompt token done + i + 1 (the last one of the prompt predicts
        the first generated token: not a prompt logprob)."""
        from .sampling import batch_logprobs

        o = 0
        for j in want:
            run, n = plan[j]
            p = run.req.prompt
            if run.prompt_logprobs is None:
                run.prompt_logprobs = [None]  # the first token: nothing predicts it
            k = min(n, len(p) - run.done - 1)  # rows whose next token is still in the prompt
            if k > 0:
                top = run.req.prompt_logprobs
                lp, ids, vals = batch_logprobs(logits[o:o + k], torch.tensor(p[run.done + 1:run.done + 1 + k],
                                                                              device=logits.device), top)
                for v, i, t in zip(lp.tolist(), ids.tolist(), vals.tolist()):
                    run.prompt_logprobs.append((v, list(zip(i, t))))
            o += n

    def step(self, now, final: bool = False) -> list[RequestResult]:
        """Run one step over the queue; ``now()`` gives the run clock for TTFTs;
        ``final``: no more requests are coming."""
        plan = self.plan_step(self.queue, final)
        results = []
        for run in self.run_step(plan):
            self.queue.remove(run)
            results.append(RequestResult(run.req.id, len(run.req.prompt), int(run.logits.argmax()), run.logits,
                                         run.cached() if self.keep_kv else [], now() - run.req.arrival,
                                         run.prompt_logprobs))
        return results

    @property
    def queued_tokens(self) -> int:
        return _tokens_left(self.queue)

    @property
    def oldest_arrival(self) -> float | None:
        return min((run.req.arrival for run in self.queue), default=None)

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
        """Offline or timed arrivals on a rank of its own (see :class:`StepDriver`)."""
        return StepDriver(self, ArrivalSource(requests, self.validate)).run(progress)


class RequestSource(Protocol):
    """Where a driver's requests come from: a known list with arrival times, or a live queue."""

    def poll(self, now: float) -> list[Request]:
        """The requests that have arrived by ``now`` (run-clock seconds) and not been taken."""

    @property
    def more_coming(self) -> bool:
        """Whether more requests may still arrive."""

    def wait(self, now: float, max_s: float | None) -> None:
        """Idle until the next arrival is likely (at most ``max_s`` seconds when given)."""


class ArrivalSource:
    """Requests known up front; each joins at its ``arrival`` (offline runs: all at 0)."""

    def __init__(self, requests: list[Request], validate: Callable[[Request], None] | None = None):
        for r in requests if validate else ():
            validate(r)  # every request checked before the first step
        self.pending = deque(sorted(requests, key=lambda r: r.arrival))
        self.total_tokens = sum(len(r.prompt) for r in requests)

    def poll(self, now: float) -> list[Request]:
        out = []
        while self.pending and self.pending[0].arrival <= now:
            out.append(self.pending.popleft())
        return out

    @property
    def more_coming(self) -> bool:
        return bool(self.pending)

    def wait(self, now: float, max_s: float | None) -> None:
        gap = max(0.0, self.pending[0].arrival - now) if self.pending else 0.0
        time.sleep(gap if max_s is None else min(gap, max_s))


class Submitted:
    """A source for callers that submit to the engine themselves (the serving loop)."""

    more_coming = False

    def poll(self, now: float) -> list[Request]:
        return []

    def wait(self, now: float, max_s: float | None) -> None:
        pass


@dataclass
class ShortStepHold:
    """Hold back a step smaller than ``min_tokens()`` for at most ``max_s`` (counted from
    its oldest request's arrival) while more requests may come, so it can fill up.

    DWDP: a step pulls every remote expert whatever its size, so one below the break-even
    size (:meth:`~dwdp.parallel.dwdp.DWDPRuntime.break_even_tokens`, measured) waits on its
    pulls; a few ms of holding can turn two such steps into one that hides them.
    ``min_tokens()`` returns None while nothing is measured (no hold). Each strategy says
    whether its steps have one (:meth:`~dwdp.parallel.strategies.Strategy.short_step_hold`)."""

    max_s: float
    min_tokens: Callable[[], int | None]


class StepDriver:
    """The one step loop, shared by ``dwdp run``, the bench, serving and the prefill group.

    Each round it takes the requests that have arrived, then runs one step of the engine.
    Ranks of a lockstep group (``sync`` given: expert parallelism, whose steps hold
    collectives) first OR two flags over the group with ``sync([has_work, more_coming])``:
    while any rank has work every rank steps, an idle one with a
    :meth:`~PrefillEngine.dummy_step` so the collectives line up; the loop ends when no
    rank has work and no arrivals are to come. A rank on its own (dp, dwdp) steps only on
    its own work and idles until its next arrival; with a :class:`ShortStepHold` it also
    waits a bounded moment before a step too short to hide its pulls.
    """

    def __init__(self, engine: PrefillEngine, source: RequestSource,
                 sync: Callable[[list[bool]], list[bool]] | None = None, idle_poll_s: float = 0.0005,
                 start: float | None = None, hold: ShortStepHold | None = None):
        self.engine, self.source, self.sync, self.idle_poll_s = engine, source, sync, idle_poll_s
        self.hold = hold if sync is None else None  # a lockstep rank steps when its group does
        self.held_s = 0.0  # total time steps were held back
        self._start = time.perf_counter() if start is None else start  # perf_counter() at clock 0

    def clock(self) -> float:
        """Seconds since the driver started: the run clock of arrivals and TTFTs."""
        return time.perf_counter() - self._start

    def step_once(self) -> list[RequestResult] | None:
        """One round: the requests it finished ([] for an idle or dummy round), or None
        once there is no work left anywhere and none to come."""
        engine, now = self.engine, self.clock()
        for req in self.source.poll(now):
            engine.submit(req)
        busy, more = engine.has_work, self.source.more_coming
        if self.sync is not None:
            busy, more = self.sync([busy, more])
        if not busy:
            if not more:
                return None
            # A lockstep rank must come back to the group soon: its peers may get work.
            self.source.wait(now, self.idle_poll_s if self.sync is not None else None)
            return []
        if engine.has_work:
            if more and self._hold(now):
                return []
            return engine.step(self.clock, final=not more)
        engine.dummy_step()
        return []

    def _hold(self, now: float) -> bool:
        """Wait (bounded) for more work instead of running a step below break-even."""
        if self.hold is None or self.hold.max_s <= 0:
            return False
        need = self.hold.min_tokens()
        queued = self.engine.queued_tokens
        if need is None or queued >= min(need, self.engine.max_num_tokens):
            return False
        left = self.hold.max_s - (now - self.engine.oldest_arrival)
        if left <= 0:
            return False
        self.source.wait(now, left)
        self.held_s += self.clock() - now
        return True

    def run(self, progress: bool = False) -> list[RequestResult]:
        results: list[RequestResult] = []
        bar = _bar(progress, getattr(self.source, "total_tokens", None))
        while (done := self.step_once()) is not None:
            results += done
            if bar is not None and done:
                bar.update(sum(r.prompt_len for r in done))
        if bar is not None:
            bar.close()
        return results


def _bar(progress: bool, total: int | None):
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
