"""The server process: the app (:mod:`.app`) on uvicorn, its connection deadlines, its
logs and its signals.

Robustness, in the order a request meets it: uvicorn's h11 parser refuses malformed
requests (bad ``Content-Length``, TLS bytes, ...) with a 400; a connection must deliver
its headers within ``header_timeout_s`` and its body within ``body_timeout_s``; the
app's pydantic models (:mod:`.protocol`) check every field before anything reaches the
serving loop. Binds to 127.0.0.1 unless told otherwise.

Logs (logger ``dwdp.serve``): a line per finished request, a throughput line every
``log_interval_s`` while busy (as vLLM prints: prompt and generation tok/s, running,
waiting, KV cache use), and every change of health (a prefill or decode rank that died,
the group restarted). The first SIGINT / SIGTERM drains (running requests finish, up to
the drain timeout), a second one ends the drain at once, a third exits on the spot.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import LOG, SERVED_BY, build_app  # noqa: F401  (public names of the server, as before the split)
from .protocol import MAX_BODY, MAX_LOGPROBS, MAX_STOP, ApiError, BadRequest, parse_json  # noqa: F401
from .text import Detokenizer, TextStream, load_tokenizer  # noqa: F401
from .worker import ServingWorker


def _protocol(header_timeout_s: float):
    """uvicorn's h11 protocol plus a deadline for a request's headers: a client that
    trickles them (or sends nothing) is cut off instead of holding the connection."""

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self):
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still no complete request head
                self.transport.close()

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


def kv_usage(decode) -> tuple[int, int, float] | None:
    """(slots used, slots, share of the cache's tokens held) of a decode engine in this
    process; None for a decode group in other processes."""
    active, slots, ctx = list(getattr(decode, "active", [])), getattr(decode, "max_batch", None), \
        getattr(decode, "max_context", None)
    if slots is None or ctx is None or not hasattr(decode, "cache"):
        return None
    return len(active), slots, sum(a.length for a in active) / (slots * ctx)


class StatsLog:
    """The server's periodic log: a throughput line every ``interval_s`` while there is
    work (vLLM-style), and a line for each change of health (a rank died, its group was
    restarted, gave up, ...). :meth:`tick` is one check: the thread calls it, a test can too."""

    def __init__(self, worker: ServingWorker, interval_s: float = 10.0, clock=time.monotonic, log=LOG):
        self.worker, self.interval_s, self.clock, self.log = worker, interval_s, clock, log
        self._last = (clock(), worker.metrics.value("dwdp_prompt_tokens_total"), worker.generated.total)
        self._health = ("ok", None)

    def tick(self) -> str | None:
        """Log a health change now, and the throughput line once ``interval_s`` has passed
        with work done or waiting. Returns the throughput line if one was logged."""
        health = self.worker.health()
        if health != self._health:
            state, reason = health
            if state == "ok":
                self.log.info("server health: ok (was %s)", self._health[0])
            else:
                self.log.warning("server health: %s: %s", state, reason)
            self._health = health
        now = self.clock()
        t, prompt0, gen0 = self._last
        if now - t < self.interval_s:
            return None
        w = self.worker
        prompt, gen = w.metrics.value("dwdp_prompt_tokens_total"), w.generated.total
        self._last = (now, prompt, gen)
        running = len(getattr(w.decode, "active", []))
        waiting = max(0, w.in_flight() - running)
        if prompt == prompt0 and gen == gen0 and not running and not waiting:
            return None  # idle: nothing to say
        kv = kv_usage(w.decode)
        kv_text = f", KV cache {100 * kv[2]:.1f}% ({kv[0]}/{kv[1]} slots)" if kv else ""
        line = (f"prompt throughput {(prompt - prompt0) / (now - t):.1f} tok/s, generation throughput "
                f"{(gen - gen0) / (now - t):.1f} tok/s, running {running}, waiting {waiting}{kv_text}")
        self.log.info("%s", line)
        return line

    def run(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        while not stop.wait(poll_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001  (a log line must never take the server down)
                self.log.warning("stats log failed: %s: %s", type(e).__name__, e)


def configure_logging() -> None:
    """INFO lines of ``dwdp`` on stderr, unless the process has set up logging itself."""
    root, ours = logging.getLogger(), logging.getLogger(__name__.partition(".")[0])  # the package logger
    if root.handlers or ours.handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%m-%d %H:%M:%S"))
    ours.addHandler(h)
    ours.setLevel(logging.INFO)


class Server:
    """The app on uvicorn in a background thread. ``port=0`` picks a free port (``.port``).
    ``model_name``: the name (or names) the model is served under."""

    def __init__(self, worker: ServingWorker, model_name: str | list[str], host: str = "127.0.0.1",
                 port: int = 8000, tokenizer=None, api_key: str | None = None, *, drain_timeout_s: float = 30.0,
                 header_timeout_s: float = 10.0, body_timeout_s: float = 30.0, request_timeout_s: float = 600.0,
                 backlog: int = 2048, max_connections: int = 4096, log_interval_s: float = 10.0):
        self.worker = worker
        self.drain_timeout_s = drain_timeout_s
        self.app = build_app(worker, model_name, tokenizer, api_key, request_timeout_s, body_timeout_s)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # now, so a busy port fails here and .port is known
        self.config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", backlog=backlog,
            timeout_keep_alive=5, http=_protocol(header_timeout_s), limit_concurrency=max_connections,
            timeout_graceful_shutdown=5)
        self.uv = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self.stats = StatsLog(worker, log_interval_s)
        self._stats_stop = threading.Event()
        self.signals = 0  # SIGINT / SIGTERM received by serve_until_signal

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def start(self, timeout_s: float = 30.0) -> None:
        self.worker.start()
        self._thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, name="dwdp-http",
                                        daemon=True)
        self._thread.start()
        threading.Thread(target=self.stats.run, args=(self._stats_stop,), name="dwdp-stats", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self.uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)

    def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Refuse new requests (503), let running ones finish for up to the drain timeout
        (then they end with an error event / 500 saying so), then close the listener."""
        self.worker.stop(self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        self._stats_stop.set()
        self.uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.sock.close()

    def on_signal(self, signum=None, frame=None) -> None:
        """The first signal starts the drain (the main loop sees ``signals``); a second ends
        it now, a third exits on the spot. Writes with os.write: a handler that prints could
        land inside the main thread's own print and raise."""
        self.signals += 1
        if self.signals == 2:
            os.write(2, b"dwdp serve: second signal: forcing the exit now; requests still running fail\n")
            self.worker.abort_drain()
        elif self.signals > 2:
            os.write(2, b"dwdp serve: third signal: exiting at once\n")
            os._exit(1)

    def serve_until_signal(self) -> None:
        configure_logging()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.on_signal)
        self.start()
        # Never an unbounded wait: Python runs signal handlers on the main thread only, and a
        # signal that lands on another thread (CUDA, torch and HTTP threads are most of them)
        # does not interrupt a lock wait here; SIGTERM was then lost until the next signal.
        while not self.signals:
            time.sleep(0.2)
        n = self.worker.in_flight()
        LOG.info("shutting down: %s", f"draining {n} request(s) in flight for up to {self.drain_timeout_s:g} s "
                 "(Ctrl-C again to force the exit)" if n else "no requests in flight")
        self.shutdown()
