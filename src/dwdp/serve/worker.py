"""The serving loop: one thread that owns the engines and turns requests into token events.

Requests enter a bounded inbox (full -> :class:`QueueFull`, the HTTP layer answers 429).
The loop alternates a prefill step (MNT-budgeted, chunked) with a decode step over every
running request. A prefill that finishes hands its KV cache to decode through a
:class:`KVHandoff` (here a device copy in one process; the interface is what a network
transfer would implement). If the loop dies, every waiting or running request receives an
error event naming the cause, and :attr:`ServingWorker.failure` is set (``/health`` -> 503).
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from ..decode import DecodeEngine, DecodeRequest, SamplingParams, sample
from ..engine import PrefillEngine, Request
from ..models.transformer import LayerKV
from .metrics import Metrics


class QueueFull(RuntimeError):
    pass


class WorkerDown(RuntimeError):
    pass


class KVHandoff:
    """Moves a finished prefill's KV cache to the decode side."""

    def send(self, kv: list[LayerKV]) -> list[LayerKV]:
        raise NotImplementedError


class LocalKVHandoff(KVHandoff):
    """Same process: a copy onto the decode device (a no-op view when it is the same one)."""

    def __init__(self, device: torch.device):
        self.device = device

    def send(self, kv):
        return [(a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True)) for a, b in kv]


@dataclass
class ServeRequest:
    prompt: list[int]
    params: SamplingParams
    id: str = ""
    arrival: float = field(default_factory=time.perf_counter)
    events: queue.Queue = field(default_factory=queue.Queue)  # ("token", id) / ("done", reason) / ("error", msg)


class ServingWorker(threading.Thread):
    def __init__(self, model, max_num_tokens: int = 8192, max_batch: int = 64, max_queue: int = 256,
                 metrics: Metrics | None = None, handoff: KVHandoff | None = None):
        super().__init__(name="dwdp-serving", daemon=True)
        self.model = model
        self.prefill = PrefillEngine(model, max_num_tokens, keep_kv=True)
        self.decode = DecodeEngine(model, max_batch)
        self.handoff = handoff or LocalKVHandoff(self.decode.device)
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.inbox: queue.Queue[ServeRequest] = queue.Queue()
        self.failure: str | None = None
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._draining = False
        self._live: dict[str, ServeRequest] = {}  # admitted and not finished
        self._emitted: dict[str, int] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._start = time.perf_counter()

    # -- called from HTTP threads ------------------------------------------------------
    def submit(self, req: ServeRequest) -> ServeRequest:
        if self.failure:
            raise WorkerDown(self.failure)
        if self._draining:
            raise WorkerDown("the server is shutting down")
        cfg = self.model.config
        req.params.validate(cfg.vocab_size)
        if not req.prompt:
            raise ValueError("the prompt is empty")
        if min(req.prompt) < 0 or max(req.prompt) >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        if len(req.prompt) + req.params.max_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.params.max_tokens}) exceeds the "
                             f"model's context of {cfg.max_position_embeddings} tokens")
        with self._lock:
            if len(self._live) >= self.max_queue:
                self.metrics.inc("dwdp_requests_rejected_total")
                raise QueueFull(f"{len(self._live)} requests in flight (limit {self.max_queue}); retry later")
            self._next_id += 1
            req.id = req.id or f"cmpl-{self._next_id}"
            self._live[req.id] = req
        self.metrics.inc("dwdp_requests_total")
        self.metrics.inc("dwdp_prompt_tokens_total", len(req.prompt))
        self.inbox.put(req)
        self._wake.set()
        return req

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting; let running requests finish (up to the timeout), then end."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while self._live and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.02)
        self._halt.set()
        self.join(timeout=10)
        self._fail_all("the server shut down before this request finished")

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._halt.is_set():
                if not self._admit() and not self._prefill_pending() and not self.decode.has_work:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if self._prefill_pending():
                    self._prefill_step()
                if self.decode.has_work:
                    self._decode_step()
                self.metrics.set("dwdp_queue_depth", self._prefill_queue_depth() + len(self.decode.waiting))
                self.metrics.set("dwdp_running_requests", len(self.decode.active))
        except BaseException as e:  # report, fail every request, never hang a client
            self.failure = f"serving loop crashed: {type(e).__name__}: {e}"
            traceback.print_exc()
            self._fail_all(self.failure)

    # -- prefill: in this process (overridden by a remote prefill pool) ------------------
    def _admit(self) -> bool:
        got = False
        while True:
            try:
                req = self.inbox.get_nowait()
            except queue.Empty:
                return got
            self._dispatch(req)
            got = True

    def _dispatch(self, req: ServeRequest) -> None:
        self.prefill.submit(Request(req.id, req.prompt, req.arrival - self._start))

    def _prefill_pending(self) -> bool:
        return self.prefill.has_work

    def _prefill_queue_depth(self) -> int:
        return len(self.prefill.queue)

    def _prefill_step(self) -> None:
        clock = lambda: time.perf_counter() - self._start  # noqa: E731
        for res in self.prefill.step(clock):
            self._prefilled(res.id, res.logits, res.kv, res.prompt_len)

    def _prefilled(self, rid, logits, kv, prompt_len) -> None:
        """A prompt is prefilled: sample its first token, hand its KV cache to decode."""
        req = self._live.get(rid)
        if req is None:
            return
        p = req.params
        gen = torch.Generator().manual_seed(p.seed) if p.temperature > 0 and p.seed is not None else None
        first = sample(logits, p, gen)
        self.metrics.observe("ttft", time.perf_counter() - req.arrival)
        self.decode.add(DecodeRequest(rid, self.handoff.send(kv), first, p, prompt_len))
        self._emit_new(req, [first], 0)

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        running = list(self.decode.active) + list(self.decode.waiting)
        finished = self.decode.step()
        dt = time.perf_counter() - t0
        new_tokens = 0
        for a in running:
            req = self._live.get(a.req.id)
            if req is None:
                continue
            sent = self._emitted.get(req.id, 0)
            if len(a.tokens) > sent:
                new_tokens += len(a.tokens) - sent
                for _ in range(len(a.tokens) - sent):
                    self.metrics.observe("itl", dt)
                self._emit_new(req, a.tokens[sent:], sent)
        if dt > 0:
            self.metrics.set("dwdp_tokens_per_second", new_tokens / dt)
        for r in finished:
            req = self._live.pop(r.id, None)
            self._emitted.pop(r.id, None)
            if req is not None:
                req.events.put(("done", r.finish_reason))

    def _emit_new(self, req: ServeRequest, tokens: list[int], already: int) -> None:
        for t in tokens:
            req.events.put(("token", t))
        self._emitted[req.id] = already + len(tokens)
        self.metrics.inc("dwdp_generation_tokens_total", len(tokens))

    def _fail_all(self, msg: str) -> None:
        with self._lock:
            live, self._live = self._live, {}
        for req in live.values():
            self.metrics.inc("dwdp_requests_failed_total")
            req.events.put(("error", msg))
