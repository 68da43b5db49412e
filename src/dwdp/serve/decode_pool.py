"""Decode across processes with expert parallelism: the generation group of disaggregated
serving (``dwdp serve --decode-ranks N``).

Each rank holds the non-expert weights and E/N of the routed experts (DEP: attention
data parallel + expert parallel, :func:`~dwdp.parallel.ep.apply_dep`), so a model that
does not fit one GPU can be decoded. The server routes each prefilled request (its KV
cache and first token) to the rank with the fewest running requests; the ranks step in
lockstep (:class:`~dwdp.decode.DecodeEngine` with ``lockstep``: a rank with nothing to
decode runs one-row dummy steps while a peer decodes) and send every step's new tokens
back. :class:`DecodePool` is what the serving loop sees: the decode engine's interface
(``add`` / ``step`` / ``cancel`` / ``fail_active``, ``active`` / ``waiting``), with
mirrors of the remote requests.

A rank that dies takes the group down (its peers would block in the next all-to-all).
:class:`SupervisedDecodePool` (what ``dwdp serve --decode-ranks`` runs) then kills the
survivors and restarts the group in the background, with back-off, at most
``max_restarts`` times; health reads ``degraded`` until it is back, ``down`` once the
restarts are used up. No running request is lost: each resumes on the new group where the
client's stream stands. The server prefills its prompt plus the tokens it has streamed but
the last, and the new group decodes on from that last token (already streamed, so not
sampled again) with what is left of its token budget: the client sees every token once,
and greedy output is what it would have been. A request that was running at
``max_request_retries`` + 1 deaths fails with an error saying so (it may be what kills
the ranks). Requests prefilled while the group restarts wait for it (the model may not fit
the server's device, so there is no local decode). Deaths and restarts are logged at
WARNING. Known limit: sampling penalties over earlier output tokens restart from the
resumed token (the rank sees only what it decodes).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field, fields, replace

import torch

from ..decode import DecodeRequest, DecodeResult, _Active
from ..parallel.faults import fault_point
from ..strategy.spec import DEP, DEPConfig, RankSpec
from .rank_group import GroupRestarter, RankProcesses, leave_group, rank_process

log = logging.getLogger(__name__)


@dataclass
class DecodePoolSpec:
    model: str
    world_size: int = 2
    num_layers: int | None = None
    dtype: str | None = None
    device: str = "cpu"
    expert_dtype: str = "auto"
    max_batch: int = 64  # per rank
    max_context: int | None = None
    seed: int = 0
    peer_timeout_s: float = 60.0
    dep: DEPConfig = field(default_factory=DEPConfig)
    dense_dtype: str = "auto"  # the projections, as --dense-dtype

    def rank_spec(self) -> RankSpec:
        return RankSpec(model=self.model, strategy=DEP, num_layers=self.num_layers, dtype=self.dtype,
                        device=self.device, group_size=self.world_size, expert_dtype=self.expert_dtype,
                        dense_dtype=self.dense_dtype, dep=self.dep,
                        seed=self.seed, max_num_tokens=self.max_batch, peer_timeout_s=self.peer_timeout_s)


def _decode_rank(rank: int, port: int, run_id: str, spec: DecodePoolSpec, inq, outq) -> None:
    from ..decode import DecodeEngine
    from ..parallel.group import PeerWatchdog, init_dwdp_groups, lockstep_sync
    from ..parallel.rank import build_rank

    with rank_process(rank, spec.world_size, port, run_id, outq):
        ctx = init_dwdp_groups(spec.world_size, spec.device, timeout_s=max(spec.peer_timeout_s, 30.0))
        watchdog = PeerWatchdog(ctx, spec.peer_timeout_s) if spec.world_size > 1 else None
        dec_rank = build_rank(spec.rank_spec(), ctx)
        sync = lockstep_sync(ctx)
        engine = DecodeEngine(dec_rank.model, spec.max_batch, spec.max_context, cuda_graphs=False, lockstep=sync)
        outq.put(("ready", rank, engine.max_context))
        emitted: dict = {}  # tokens of each request already sent back
        stopping = False

        def take(item) -> None:
            nonlocal stopping
            if item is None:
                stopping = True
            elif item[0] == "add":
                req: DecodeRequest = item[1]
                req.kv = [(a.to(engine.device), b.to(engine.device)) for a, b in req.kv]
                try:
                    engine.add(req)
                    emitted[req.id] = 1  # the first token came from the prefill
                except Exception as e:  # noqa: BLE001  (this request's fault)
                    outq.put(("tokens", rank, [(req.id, [], [], "error", f"{type(e).__name__}: {e}")]))
            elif item[0] == "cancel":
                for r in engine.cancel(item[1]):
                    emitted.pop(r.id, None)

        while True:
            while True:
                try:
                    take(inq.get_nowait())
                except queue.Empty:
                    break
            busy, open_ = sync([engine.has_work, not stopping])
            if busy:
                running = list(engine.active) + list(engine.waiting)
                engine.step()
                updates = []
                for a in running:
                    rid, sent = a.req.id, emitted.get(a.req.id, 1)
                    if len(a.tokens) > sent or a.finish_reason:
                        updates.append((rid, a.tokens[sent:], a.logprobs[sent:], a.finish_reason, a.error))
                        emitted[rid] = len(a.tokens)
                    if a.finish_reason:
                        emitted.pop(rid, None)
                if updates:
                    outq.put(("tokens", rank, updates))
                if running:
                    fault_point("decode-step", rank)
            elif not open_:
                break  # every rank is closing and none has work
            else:
                try:  # a lockstep rank must come back to the group soon: its peers may get work
                    take(inq.get(timeout=0.002))
                except queue.Empty:
                    pass
            if watchdog is not None:
                watchdog.check()
        leave_group(watchdog, dec_rank)


class GroupFailed(RuntimeError):
    """A rank died; ``done``: the requests that finished in the events read before it."""

    def __init__(self, reason: str, done: list[DecodeResult]):
        super().__init__(reason)
        self.done = done


class DecodePool(RankProcesses):
    """The decode engine interface over a DEP generation group in other processes."""

    device = torch.device("cpu")  # where the server hands KV over (shared memory to the ranks)

    def __init__(self, spec: DecodePoolSpec, ready_timeout_s: float = 300.0):
        self.spec = spec
        super().__init__(_decode_rank, spec, spec.world_size, "decode", ready_timeout_s)
        self.max_context = min(self.ready.values())  # what every rank's cache slot holds
        self.active: list[_Active] = []
        self.waiting: list[_Active] = []  # (never used: a rank queues what it cannot admit yet)
        self.steps = 0
        self._where: dict = {}  # request id -> rank
        self._by_id: dict = {}
        self.load = [0] * spec.world_size  # running requests per rank
        self.routed = [0] * spec.world_size  # requests sent to each rank, ever

    @property
    def has_work(self) -> bool:
        return bool(self.active)

    def add(self, req: DecodeRequest, mirror: _Active | None = None) -> None:
        """Decode ``req`` on the least loaded rank. ``mirror``: a resumed request's record
        (its original request, the tokens and logprobs streamed so far), which the rank's
        tokens extend; by default a new one."""
        if self.dead():
            raise RuntimeError(f"the decode group is down: {self.dead()}")
        r = min(range(len(self.load)), key=lambda i: (self.load[i], i))
        a = mirror or _Active(replace(req, kv=[]), [req.first_token], None)
        if mirror is None and req.params.logprobs is not None and req.first_logprobs is not None:
            a.logprobs.append(req.first_logprobs)
        self.inqs[r].put(("add", req))
        self.load[r] += 1
        self.routed[r] += 1
        self._where[req.id], self._by_id[req.id] = r, a
        self.active.append(a)

    def _drop(self, rid) -> _Active | None:
        a = self._by_id.pop(rid, None)
        if a is not None:
            self.load[self._where.pop(rid)] -= 1
            self.active.remove(a)
        return a

    def step(self, wait_s: float = 0.005) -> list[DecodeResult]:
        """The tokens the ranks produced since the last call (waits up to ``wait_s`` for
        the first); raises if a rank died."""
        failed, events = self.dead(), []
        try:
            events.append(self.outq.get(timeout=wait_s))
            while True:
                events.append(self.outq.get_nowait())
        except queue.Empty:
            pass
        done = []
        for kind, rank, val in events:
            if kind == "error":
                failed = f"decode rank {rank} failed: {val}"
                continue
            self.steps += 1
            for rid, toks, lps, reason, error in val:
                a = self._by_id.get(rid)
                if a is None:  # cancelled meanwhile
                    continue
                a.tokens += toks
                a.logprobs += lps
                if reason:
                    a.finish_reason, a.error = reason, error
                    self._drop(rid)
                    done.append(DecodeResult(rid, a.tokens, reason, a.itl, error))
        if failed:  # the dead rank first: a peer's error is often just "connection closed"
            dead = self.dead(wait_s=1.0)
            raise GroupFailed(failed if dead is None or failed == dead else f"{dead}; {failed}", done)
        return done

    def cancel(self, ids) -> list[DecodeResult]:
        out, by_rank = [], {}
        for rid in ids:
            r = self._where.get(rid)
            a = self._drop(rid)
            if a is not None:
                by_rank.setdefault(r, []).append(rid)
                out.append(DecodeResult(rid, a.tokens, "cancelled", a.itl))
        for r, rids in by_rank.items():
            self.inqs[r].put(("cancel", rids))
        return out

    def fail_active(self, msg: str) -> list[DecodeResult]:
        gone = list(self.active)
        for a in gone:
            self._drop(a.req.id)
        return [DecodeResult(a.req.id, a.tokens, "error", a.itl, msg) for a in gone]


def _left(params, streamed: int):
    """``params`` for a request resumed after ``streamed`` tokens, the first of the new run
    among them: the token budgets count what was already generated."""
    done = streamed - 1
    change = {"max_tokens": params.max_tokens - done}
    if "min_tokens" in {f.name for f in fields(params)}:
        change["min_tokens"] = max(0, params.min_tokens - done)
    return replace(params, **change)


class SupervisedDecodePool:
    """The decode engine interface over a :class:`DecodePool` that is restarted when a rank
    dies, its running requests resumed on the new one (see the module docstring).
    ``factory(spec)`` builds a pool (tests inject one). The serving worker calls
    :meth:`bind_server` with what resuming needs: the model to prefill with, in the server
    process, and each request's prompt; unbound, a death fails the running requests."""

    device = torch.device("cpu")

    def __init__(self, spec: DecodePoolSpec, max_restarts: int = 3, factory=None, ready_timeout_s: float = 300.0,
                 max_request_retries: int = 2):
        self.spec, self.max_restarts, self.max_request_retries = spec, max_restarts, max_request_retries
        factory = factory or (lambda s: DecodePool(s, ready_timeout_s))
        self.pool: DecodePool | None = factory(spec)
        self._restarter = GroupRestarter(lambda: factory(spec), max_restarts, "decode")
        self.max_context = self.pool.max_context
        # Prefilled (or resumed) while the group restarts: (request, mirror of a resumed one).
        self.held: list[tuple[DecodeRequest, _Active | None]] = []
        self.waiting: list[_Active] = []
        self.degraded: str | None = None  # serving impaired (restarting): the reason
        self.down: str | None = None  # restarts used up: the reason
        self._failures: list[DecodeResult] = []  # requests a death took down, not yet reported
        self._deaths: dict = {}  # request id -> group deaths it was running at
        self._model = None
        self._max_num_tokens = 0
        self._prompt_of = None

    def bind_server(self, model, max_num_tokens: int, prompt_of) -> None:
        """``model``: the whole model in the server process; ``prompt_of(id)``: a running
        request's prompt token ids (None once it is gone)."""
        self._model, self._max_num_tokens, self._prompt_of = model, max_num_tokens, prompt_of

    @property
    def restarts(self) -> int:
        return self._restarter.attempts

    @property
    def active(self) -> list[_Active]:
        return self.pool.active if self.pool is not None else []

    @property
    def has_work(self) -> bool:
        return bool(self.active) or bool(self.held) or bool(self._failures)

    def add(self, req: DecodeRequest) -> None:
        if self.pool is not None and self.pool.dead():  # died while idle: its requests resume at the next poll
            self._group_failed(self.pool.dead())
        if self.down:
            raise RuntimeError(self.down)
        if self.pool is None:
            self.held.append((req, None))
            return
        try:
            self.pool.add(req)
        except RuntimeError as e:  # died just now: this one waits for the restart
            self._group_failed(str(e))
            self.held.append((req, None))

    def step(self, wait_s: float = 0.005) -> list[DecodeResult]:
        """Tokens since the last call; when the group died, its running requests resume on
        the restarted one (or come back as errors, see the module docstring)."""
        failed = self.supervise()
        if self.pool is None:
            time.sleep(wait_s)
            return failed
        try:
            return self._finished(failed + self.pool.step(wait_s))
        except GroupFailed as e:  # what finished before the death is delivered, the rest resumes
            self._group_failed(str(e))
            return self._finished(failed + e.done) + self.supervise()

    def _finished(self, results: list[DecodeResult]) -> list[DecodeResult]:
        for r in results:
            self._deaths.pop(r.id, None)
        return results

    def supervise(self) -> list[DecodeResult]:
        """Notice a dead group (idle or not) and a finished restart; the requests a death
        took down for good come back as error results."""
        if self.pool is not None and self.pool.dead():
            self._group_failed(self.pool.dead())
        done = self._restarter.poll()
        if done is not None:
            pool, err = done
            if pool is None:
                log.warning("decode group restart %d/%d failed: %s", self._restarter.attempts, self.max_restarts, err)
                self._start_restart(f"restart failed: {err}")
            else:
                self.pool, self.degraded = pool, None
                held, self.held = self.held, []
                log.warning("decode group restarted (attempt %d/%d); %d request(s) that waited for it go on",
                            self._restarter.attempts, self.max_restarts, len(held))
                for i, (req, mirror) in enumerate(held):
                    try:
                        pool.add(req, mirror)
                    except RuntimeError as e:  # the new group died already
                        self.held = held[i:] + self.held
                        self._group_failed(str(e))
                        break
        out, self._failures = self._failures, []
        return self._finished(out)

    def _group_failed(self, reason: str) -> None:
        pool, self.pool = self.pool, None
        running = list(pool.active)
        pool.fail_active("")  # forget them there: they resume below
        pool.kill()  # its peers would block on the dead rank: reap them now
        log.warning("decode group failed: %s; resuming the %d request(s) it was running", reason, len(running))
        self._resume(running, reason)
        self._start_restart(reason)

    def _resume(self, running: list[_Active], reason: str) -> None:
        """Queue each running request for the next group where its stream stands (see the
        module docstring), or fail it: unbound, gone, or at too many deaths."""
        todo = []
        for a in running:
            rid = a.req.id
            n = self._deaths[rid] = self._deaths.get(rid, 0) + 1
            prompt = self._prompt_of(rid) if self._prompt_of is not None else None
            if self._model is None:
                why = f"decode group failed: {reason}"
            elif n > self.max_request_retries:
                why = (f"decode group failed: {reason}; this request was running at each of the group's last {n} "
                       f"deaths: not retried again (it may be what kills the ranks)")
            elif prompt is None:  # finished or cancelled in the server meanwhile
                self._deaths.pop(rid, None)
                continue
            else:
                todo.append((a, prompt))
                continue
            self._failures.append(DecodeResult(rid, a.tokens, "error", a.itl, why))
        if not todo:
            return
        try:
            kvs = self._prefill([prompt + a.tokens[:-1] for a, prompt in todo])
        except Exception as e:  # noqa: BLE001  (the server's device: fail these, keep serving)
            why = f"decode group failed ({reason}) and re-prefilling its requests failed: {type(e).__name__}: {e}"
            self._failures += [DecodeResult(a.req.id, a.tokens, "error", a.itl, why) for a, _ in todo]
            return
        for (a, prompt), kv in zip(todo, kvs):
            k, o = len(a.tokens), a.req
            first_lp = a.logprobs[k - 1] if o.params.logprobs is not None and len(a.logprobs) >= k else None
            req = DecodeRequest(o.id, kv, a.tokens[-1], _left(o.params, k), len(prompt) + k - 1, o.stream, first_lp)
            self.held.append((req, _Active(o, list(a.tokens), None, logprobs=list(a.logprobs), itl=a.itl)))

    def _prefill(self, prompts: list[list[int]]) -> list[list]:
        """Each prompt's KV cache (host memory: what the group receives), prefilled here."""
        from ..engine import PrefillEngine, Request

        engine = PrefillEngine(self._model, self._max_num_tokens, keep_kv=True)
        for i, p in enumerate(prompts):
            engine.submit(Request(i, p))
        kv = {}
        while engine.has_work:
            for r in engine.step(lambda: 0.0):
                kv[r.id] = [(a.cpu(), b.cpu()) for a, b in r.kv]
        return [kv[i] for i in range(len(prompts))]

    def _start_restart(self, reason: str) -> None:
        if self._restarter.start():
            self.degraded = (f"decode group down ({reason}); restarting it "
                             f"(attempt {self._restarter.attempts}/{self.max_restarts})")
            log.warning("restarting the decode group (attempt %d/%d)", self._restarter.attempts, self.max_restarts)
        elif not self._restarter.closing:
            self.down = f"decode group down ({reason}); gave up after {self._restarter.attempts} restart(s)"
            self.degraded = None
            log.warning("decode group: gave up after %d restart(s); decode is down", self._restarter.attempts)
            held, self.held = self.held, []
            self._failures += [DecodeResult(r.id, m.tokens if m else [r.first_token], "error", [], self.down)
                               for r, m in held]

    def cancel(self, ids) -> list[DecodeResult]:
        ids = set(ids)
        for rid in ids:
            self._deaths.pop(rid, None)
        out = [DecodeResult(r.id, m.tokens if m else [r.first_token], "cancelled", []) for r, m in self.held
               if r.id in ids]
        self.held = [(r, m) for r, m in self.held if r.id not in ids]
        return out + (self.pool.cancel(ids) if self.pool is not None else [])

    def fail_active(self, msg: str) -> list[DecodeResult]:
        held, self.held = self.held, []
        out = [DecodeResult(r.id, m.tokens if m else [r.first_token], "error", [], msg) for r, m in held]
        out += self.pool.fail_active(msg) if self.pool is not None else []
        return self._finished(out)

    def close(self) -> None:
        self._restarter.closing = True
        if self.pool is not None:
            self.pool.close()
        self._restarter.close()
