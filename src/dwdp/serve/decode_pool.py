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
the running requests fail with an error naming it; there is no restart yet.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, replace

import torch

from ..decode import DecodeRequest, DecodeResult, _Active
from ..parallel.rank import RankSpec
from ..parallel.strategies import DEP
from .rank_group import RankProcesses, leave_group, rank_process


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

    def rank_spec(self) -> RankSpec:
        return RankSpec(model=self.model, strategy=DEP, num_layers=self.num_layers, dtype=self.dtype,
                        device=self.device, group_size=self.world_size, expert_dtype=self.expert_dtype,
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
