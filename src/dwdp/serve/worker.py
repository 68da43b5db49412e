"""The serving loop: one thread that owns the engines and turns requests into token events.

Requests enter a bounded inbox (full -> :class:`QueueFull`, the HTTP layer answers 429).
The loop alternates a prefill step (MNT-budgeted, chunked) with a decode step over every
running request. A prefill that finishes hands its KV cache to decode through a
:class:`KVHandoff` (here a device copy in one process; the interface is what a network
transfer would implement).

Faults are contained: anything one request's handling raises (sampling, hand-off, ...)
fails that request with its cause and the loop goes on. An engine step that raises fails
the requests it held; only ``max_engine_faults`` failed steps in a row (a broken device,
not a bad request) take the worker down: then every waiting or running request receives
an error event naming the cause, and :attr:`ServingWorker.failure` is set (``/health`` ->
503). :meth:`ServingWorker.cancel` (a client that went away, a stop string) frees the
request's slot at the loop's next iteration, i.e. within one step.

On CPU the loop computes with ``intra_op_threads`` torch threads (default 1). A decode
step is hundreds of tiny ops; with an intra-op pool each is a fork/join whose barrier
waits for every pool thread to be on a core. The server shares its cores with its own
HTTP threads and, on a test box, with the clients and whatever else runs: as soon as
the cores are oversubscribed a pool thread is descheduled at most barriers and a step
that takes 0.07 s takes seconds (64 streaming clients on 2 cores fell from
~600 to ~30 tok/s on some runs, TTFT ~10 s). One thread has no barrier to wait on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..decode import DecodeEngine, DecodeRequest
from ..sampling import SampleStream, SamplingParams, make_stream, process_logits, sample, token_logprobs
from ..engine import PrefillEngine, Request, StepDriver, Submitted
from ..models.transformer import LayerKV
from .metrics import Metrics, RateWindow


LOG = logging.getLogger("dwdp.serve")


def log_rank_event(message: str) -> None:
    """Log a rank failure or restart (the server's log also reports every change of
    health it sees, see :class:`~dwdp.serve.server.StatsLog`)."""
    LOG.warning("%s", message)


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
    # Per token, (logprob, [(id, logprob)] top-n), filled before its "token" event when
    # params.logprobs is set.
    logprobs: list = field(default_factory=list)
    # Called (from the serving thread) after each event: the HTTP layer wakes its coroutine.
    notify: Callable[[], None] | None = None
    stream: SampleStream | None = None  # the request's sampling stream, first token included
    # Per prompt token (the first: None), (logprob, top-n), set before the first "token"
    # event when params.prompt_logprobs is set.
    prompt_logprobs: list | None = None
    first_token_at: float | None = None  # perf_counter() when its first token was emitted

    def put(self, kind: str, val) -> None:
        self.events.put((kind, val))
        if self.notify is not None:
            try:
                self.notify()
            except Exception:  # noqa: BLE001  (e.g. the HTTP loop already closed: nobody listens)
                pass


class ServingWorker(threading.Thread):
    def __init__(self, model, max_num_tokens: int = 8192, max_batch: int = 64, max_queue: int = 256,
                 metrics: Metrics | None = None, handoff: KVHandoff | None = None, max_engine_faults: int = 3,
                 intra_op_threads: int | None = 1, max_context: int | None = None, decode=None,
                 decode_overlap: bool = True):
        """``decode``: the decode engine to use (default: a :class:`DecodeEngine` on the
        model's device, its steps overlapped with the host's work unless ``decode_overlap``
        is False; :class:`~dwdp.serve.decode_pool.DecodePool` decodes in an expert-parallel
        group of other processes)."""
        super().__init__(name="dwdp-serving", daemon=True)
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError("intra_op_threads must be >= 1 (or None: keep torch's setting)")
        # Torch threads of the serving loop on CPU; None leaves torch's setting (see the module doc).
        self.intra_op_threads = intra_op_threads
        self.model = model
        self.max_num_tokens = max_num_tokens
        self.prefill = PrefillEngine(model, max_num_tokens, keep_kv=True)
        self.decode = decode if decode is not None else DecodeEngine(model, max_batch, max_context,
                                                                     overlap=decode_overlap)
        self.handoff = handoff or LocalKVHandoff(self.decode.device)
        if hasattr(self.decode, "bind_server"):  # a decode group elsewhere resumes a dead rank's requests from here
            self.decode.bind_server(model, max_num_tokens, lambda rid: getattr(self._live.get(rid), "prompt", None))
        self.max_queue = max_queue
        self.max_engine_faults = max_engine_faults
        self.metrics = metrics or Metrics()
        self.inbox: queue.Queue[ServeRequest] = queue.Queue()
        self.failure: str | None = None  # set once: the worker is down (503)
        self.degraded: str | None = None  # serving, but not as configured (e.g. prefill fallback)
        self._halt = threading.Event()
        self._abort = threading.Event()  # end the drain now (a second Ctrl-C)
        self._wake = threading.Event()
        self._draining = False
        self._live: dict[str, ServeRequest] = {}  # admitted and not finished
        self._emitted: dict[str, int] = {}
        self._cancels: deque[str] = deque()
        self._faults = {"prefill": 0, "decode": 0}  # steps of each engine failed in a row
        self._lock = threading.Lock()
        self._next_id = 0
        self._start = time.perf_counter()
        # Prompts are submitted to the engine as they are admitted; the driver steps it.
        self.prefill_driver = StepDriver(self.prefill, Submitted(), start=self._start)
        # Read at scrape time, so they are current even while a step runs.
        self.metrics.bind("dwdp_queue_depth", lambda: max(0, len(self._live) - len(self.decode.active)))
        self.metrics.bind("dwdp_running_requests", lambda: len(self.decode.active))
        self.generated = RateWindow()  # generated tokens, for the tokens/s gauge and the periodic log
        self.metrics.bind("dwdp_tokens_per_second", self.generated.rate)

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
        if any(isinstance(t, bool) or not isinstance(t, int) for t in req.prompt):
            raise ValueError("token ids must be integers")
        if min(req.prompt) < 0 or max(req.prompt) >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        if len(req.prompt) + req.params.max_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.params.max_tokens}) exceeds the "
                             f"model's context of {cfg.max_position_embeddings} tokens")
        if len(req.prompt) + req.params.max_tokens > self.decode.max_context:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.params.max_tokens}) exceeds the "
                             f"server's {self.decode.max_context} tokens per request (dwdp serve --max-context)")
        if req.stream is None and req.params.temperature > 0:
            req.stream = make_stream(req.params.seed)
        with self._lock:
            if len(self._live) >= self.max_queue:
                self.metrics.inc("dwdp_requests_rejected_total")
                raise QueueFull(f"{len(self._live)} requests in flight (limit {self.max_queue}); retry later")
            self._next_id += 1
            req.id = req.id or f"cmpl-{self._next_id}"
            if req.id in self._live:
                raise ValueError(f"request id {req.id} is already in flight")
            self._live[req.id] = req
        self.metrics.inc("dwdp_requests_total")
        self.metrics.inc("dwdp_prompt_tokens_total", len(req.prompt))
        self.inbox.put(req)
        self._wake.set()
        return req

    def cancel(self, rid: str) -> bool:
        """Stop generating for ``rid`` and free its slot now; no further events are sent.
        Safe to call from any thread, for a finished or unknown id too (returns False)."""
        with self._lock:
            req = self._live.pop(rid, None)
        if req is None:
            return False
        self.metrics.inc("dwdp_requests_cancelled_total")
        self._cancels.append(rid)  # the loop drops its engine state at the next iteration
        self._wake.set()
        return True

    def in_flight(self) -> int:
        with self._lock:
            return len(self._live)

    def health(self) -> tuple[str, str | None]:
        """("ok" | "degraded" | "draining" | "down", reason)."""
        if self.failure:
            return "down", self.failure
        if getattr(self.decode, "down", None):  # a decode group that could not be restarted
            return "down", self.decode.down
        if self._draining:
            return "draining", "the server is shutting down"
        if self.degraded or getattr(self.decode, "degraded", None):
            return "degraded", self.degraded or self.decode.degraded
        return "ok", None

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting; let running requests finish (up to the timeout), then end.
        Requests still running at the deadline get an error event saying so."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while self._live and time.monotonic() < deadline and self.is_alive() and not self._abort.is_set():
            time.sleep(0.02)
        self._halt.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout=10)
        self._fail_all("the server was forced to exit before this request finished" if self._abort.is_set() else
                       f"the server shut down before this request finished (drain timeout {drain_timeout_s:g} s)")
        if hasattr(self.decode, "close"):  # a decode group in other processes
            self.decode.close()

    def abort_drain(self) -> None:
        """End a drain in progress now: the requests still running fail (a forced exit)."""
        self._abort.set()

    # -- the loop ------------------------------------------------------------------------
    def _set_threads(self) -> None:
        """Called in the serving thread itself: OpenMP's and MKL's thread counts are per
        calling thread, and this is the thread that runs every engine op."""
        if self.intra_op_threads is not None and self.decode.device.type == "cpu":
            torch.set_num_threads(self.intra_op_threads)

    def run(self) -> None:
        try:
            self._set_threads()
            dev = getattr(self.decode, "device", None)
            if isinstance(dev, torch.device) and dev.type == "cuda" and dev.index is not None:
                # The current GPU is per thread and starts at cuda:0: Triton launches and graph
                # captures go to the current one, so decode on cuda:1+ would launch on the wrong GPU.
                torch.cuda.set_device(dev)
            while not self._halt.is_set():
                self._supervise()
                self._apply_cancels()
                if not self._admit() and not self._prefill_pending() and not self.decode.has_work:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if self._prefill_pending():
                    self._guarded("prefill", self._prefill_step, self._fail_prefill)
                self._apply_cancels()
                if self.decode.has_work:
                    self._guarded("decode", self._decode_step, self._fail_decode)
        except BaseException as e:  # a bug in the loop itself: report, fail every request, never hang a client
            self._go_down(f"serving loop crashed: {type(e).__name__}: {e}")

    def _guarded(self, what: str, step, on_fault) -> None:
        """Run an engine step; if it raises, fail the requests it held and go on, unless
        steps keep failing (then the device, not a request, is broken: go down)."""
        try:
            step()
            self._faults[what] = 0
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            self._faults[what] += 1
            self.metrics.inc("dwdp_engine_faults_total")
            msg = f"{what} step failed: {type(e).__name__}: {e}"
            on_fault(msg)
            if self._faults[what] >= self.max_engine_faults:
                raise RuntimeError(f"{self._faults[what]} {what} engine steps failed in a row; last: {msg}") from e

    def _go_down(self, msg: str) -> None:
        self.failure = msg
        self.metrics.set("dwdp_degraded", 1)
        traceback.print_exc()
        self._fail_all(msg)

    def _supervise(self) -> None:
        """Health checks run every iteration, idle or not (remote prefill / decode ranks)."""
        if hasattr(self.decode, "supervise"):  # a decode group in other processes
            for r in self.decode.supervise():
                self._fail_request(r.id, r.error or "failed")

    def _apply_cancels(self) -> None:
        ids = set()
        while self._cancels:
            ids.add(self._cancels.popleft())
        if not ids:
            return
        for rid in ids:
            self._emitted.pop(rid, None)
        self.decode.cancel(ids)
        self._cancel_prefill(ids)

    def _cancel_prefill(self, ids: set[str]) -> None:
        self.prefill.queue = deque(r for r in self.prefill.queue if r.req.id not in ids)

    def _fail_request(self, rid: str, msg: str) -> None:
        with self._lock:
            req = self._live.pop(rid, None)
        self._emitted.pop(rid, None)
        if req is not None:
            self.metrics.inc("dwdp_requests_failed_total")
            req.put("error", msg)

    def _fail_prefill(self, msg: str) -> None:
        for r in self.prefill.queue:
            self._fail_request(r.req.id, msg)
        self.prefill.queue.clear()

    def _fail_decode(self, msg: str) -> None:
        for r in self.decode.fail_active(msg):
            self._fail_request(r.id, msg)

    # -- prefill: in this process (overridden by a remote prefill pool) ------------------
    def _admit(self) -> bool:
        got = False
        while True:
            try:
                req = self.inbox.get_nowait()
            except queue.Empty:
                return got
            got = True
            if req.id not in self._live:  # cancelled while queued
                continue
            try:
                self._dispatch(req)
            except Exception as e:  # noqa: BLE001
                self._fail_request(req.id, f"could not start prefill: {type(e).__name__}: {e}")

    def _dispatch(self, req: ServeRequest) -> None:
        self.prefill.submit(Request(req.id, req.prompt, req.arrival - self._start, req.params.prompt_logprobs))

    def _prefill_pending(self) -> bool:
        return self.prefill.has_work

    def _prefill_queue_depth(self) -> int:
        return len(self.prefill.queue)

    def _prefill_step(self) -> None:
        t0 = time.perf_counter()
        results = self.prefill_driver.step_once() or []
        self.prefill.steps.clear()  # per-step records: a server would grow them forever
        for res in results:
            self._prefilled(res.id, res.logits, res.kv, res.prompt_len, res.prompt_logprobs)
        self.metrics.observe("prefill_step", time.perf_counter() - t0)

    def _prefilled(self, rid, logits, kv, prompt_len, prompt_logprobs=None) -> None:
        """A prompt is prefilled: sample its first token (from the processed logits:
        penalties, logit_bias, min_tokens), hand its KV cache to decode."""
        req = self._live.get(rid)
        if req is None:  # cancelled meanwhile
            return
        try:
            p = req.params
            first = sample(process_logits(logits, p, req.prompt, []), p, req.stream)
            lp = token_logprobs(logits, first, p.logprobs) if p.logprobs is not None else None
            req.prompt_logprobs = prompt_logprobs
            self.decode.add(DecodeRequest(rid, self.handoff.send(kv), first, p, prompt_len, req.stream, lp,
                                          req.prompt if p.repetition_penalty != 1.0 else None))
        except Exception as e:  # noqa: BLE001  (this request's fault: fail it alone)
            return self._fail_request(rid, f"{type(e).__name__}: {e}")
        self.metrics.observe("ttft", time.perf_counter() - req.arrival)
        if lp is not None:
            req.logprobs.append(lp)
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
                if req.params.logprobs is not None:
                    req.logprobs.extend(a.logprobs[sent:len(a.tokens)])
                self._emit_new(req, a.tokens[sent:], sent)
        self.metrics.observe("decode_step", time.perf_counter() - t0)
        for r in finished:
            if r.finish_reason == "error":
                self._fail_request(r.id, r.error or "failed")
                continue
            with self._lock:
                req = self._live.pop(r.id, None)
            self._emitted.pop(r.id, None)
            if req is not None:
                req.put("done", r.finish_reason)

    def _emit_new(self, req: ServeRequest, tokens: list[int], already: int) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        self.generated.add(len(tokens))
        for t in tokens:
            req.put("token", t)
        self._emitted[req.id] = already + len(tokens)
        self.metrics.inc("dwdp_generation_tokens_total", len(tokens))

    def _fail_all(self, msg: str) -> None:
        with self._lock:
            live, self._live = self._live, {}
        for req in live.values():
            self.metrics.inc("dwdp_requests_failed_total")
            req.put("error", msg)
