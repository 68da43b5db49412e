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

A rank that dies takes the group down (its peers would block in the next all-to-all):
the running requests fail with an error naming it. :class:`SupervisedDecodePool` (what
``dwdp serve --decode-ranks`` runs) then kills the survivors and restarts the group in the
background, with back-off, at most ``max_restarts`` times; requests prefilled meanwhile
wait for it (the model may not fit the server's device, so there is no local fallback),
and health reads ``degraded`` until it is back, ``down`` once the restarts are used up.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field, replace

import torch

from ..decode import DecodeRequest, DecodeResult, _Active
from ..strategy.spec import DEP, DEPConfig, RankSpec
from .rank_group import GroupRestarter, RankProcesses, leave_group, rank_process


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

    def rank_spec(self) -> RankSpec:
        return RankSpec(model=self.model, strategy=DEP, num_layers=self.num_layers, dtype=self.dtype,
                        device=self.device, group_size=self.world_size, expert_dtype=self.expert_dtype, dep=self.dep,
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

    def add(self, req: DecodeRequest) -> None:
        if self.dead():
            raise RuntimeError(f"the decode group is down: {self.dead()}")
        r = min(range(len(self.load)), key=lambda i: (self.load[i], i))
        a = _Active(replace(req, kv=[]), [req.first_token], None)
        if req.params.logprobs is not None and req.first_logprobs is not None:
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
        if failed:
            raise RuntimeError(failed)
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


class SupervisedDecodePool:
    """The decode engine interface over a :class:`DecodePool` that is restarted when a rank
    dies (see the module docstring). ``factory(spec)`` builds a pool (tests inject one)."""

    device = torch.device("cpu")

    def __init__(self, spec: DecodePoolSpec, max_restarts: int = 3, factory=None, ready_timeout_s: float = 300.0):
        self.spec, self.max_restarts = spec, max_restarts
        factory = factory or (lambda s: DecodePool(s, ready_timeout_s))
        self.pool: DecodePool | None = factory(spec)
        self._restarter = GroupRestarter(lambda: factory(spec), max_restarts, "decode")
        self.max_context = self.pool.max_context
        self.held: list[DecodeRequest] = []  # prefilled while the group restarts
        self.waiting: list[_Active] = []
        self.degraded: str | None = None  # serving impaired (restarting): the reason
        self.down: str | None = None  # restarts used up: the reason
        self._failures: list[DecodeResult] = []  # requests a death took down, not yet reported

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
        if self.pool is not None and self.pool.dead():  # died while idle: its requests fail at the next poll
            self._group_failed(self.pool.dead())
        if self.down:
            raise RuntimeError(self.down)
        if self.pool is None:
            self.held.append(req)
        else:
            self.pool.add(req)

    def step(self, wait_s: float = 0.005) -> list[DecodeResult]:
        """Tokens since the last call; when the group died, its running requests come back
        as errors naming the rank (the loop fails them and goes on) and a restart begins."""
        failed = self.supervise()
        if self.pool is None:
            time.sleep(wait_s)
            return failed
        try:
            return failed + self.pool.step(wait_s)
        except RuntimeError as e:
            self._group_failed(str(e))
            return failed + self.supervise()

    def supervise(self) -> list[DecodeResult]:
        """Notice a dead group (idle or not) and a finished restart; the requests a death
        took down come back as error results."""
        if self.pool is not None and self.pool.dead():
            self._group_failed(self.pool.dead())
        done = self._restarter.poll()
        if done is not None:
            pool, err = done
            if pool is None:
                self._start_restart(f"restart failed: {err}")
            else:
                self.pool, self.degraded = pool, None
                held, self.held = self.held, []
                for req in held:
                    pool.add(req)
        out, self._failures = self._failures, []
        return out

    def _group_failed(self, reason: str) -> None:
        pool, self.pool = self.pool, None
        self._failures += pool.fail_active(f"decode group failed: {reason}")
        pool.kill()  # its peers would block on the dead rank: reap them now
        self._start_restart(reason)

    def _start_restart(self, reason: str) -> None:
        if self._restarter.start():
            self.degraded = (f"decode group down ({reason}); restarting it "
                             f"(attempt {self._restarter.attempts}/{self.max_restarts})")
        elif not self._restarter.closing:
            self.down = f"decode group down ({reason}); gave up after {self._restarter.attempts} restart(s)"
            self.degraded = None
            held, self.held = self.held, []
            self._failures += [DecodeResult(r.id, [r.first_token], "error", [], self.down) for r in held]

    def cancel(self, ids) -> list[DecodeResult]:
        ids = set(ids)
        out = [DecodeResult(r.id, [r.first_token], "cancelled", []) for r in self.held if r.id in ids]
        self.held = [r for r in self.held if r.id not in ids]
        return out + (self.pool.cancel(ids) if self.pool is not None else [])

    def fail_active(self, msg: str) -> list[DecodeResult]:
        held, self.held = self.held, []
        out = [DecodeResult(r.id, [r.first_token], "error", [], msg) for r in held]
        return out + (self.pool.fail_active(msg) if self.pool is not None else [])

    def close(self) -> None:
        self._restarter.closing = True
        if self.pool is not None:
            self.pool.close()
        self._restarter.close()
