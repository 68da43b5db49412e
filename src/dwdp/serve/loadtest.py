"""``dwdp loadtest``: replay a workload against a running ``dwdp serve`` (loopback only).

Requests (lengths from a :class:`WorkloadSpec`, random token ids) are sent as streaming
completions at a Poisson rate (or all at once), at most ``max_concurrency`` in flight and
at most ``MAX_REQUESTS`` in total. Reported, on the paper's axes: output tokens/s per GPU,
tokens/s per user (1 / time per output token), TTFT and inter-token latency percentiles.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import numpy as np

from ..workload import WorkloadSpec, generate

MAX_REQUESTS = 10_000
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _get(url: str, api_key: str | None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def one_request(base: str, prompt: list[int], max_tokens: int, api_key: str | None, timeout_s: float) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    times, error = [], None
    try:
        req = urllib.request.Request(base + "/v1/completions", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                now = time.perf_counter()
                times += [now] * len(chunk["choices"][0]["token_ids"])
    except urllib.error.HTTPError as e:
        error = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
    except OSError as e:
        error = str(e)
    return {"start": t0, "token_times": times, "prompt_len": len(prompt), "error": error}


def run_loadtest(url: str, workload: WorkloadSpec, max_tokens: int, gpus: int = 1, max_concurrency: int = 64,
                 api_key: str | None = None, timeout_s: float = 600.0, log=print) -> dict:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"dwdp loadtest only targets a server on this machine (127.0.0.1/localhost), not {host!r}")
    if not 1 <= workload.num_requests <= MAX_REQUESTS:
        raise ValueError(f"--num-requests must lie in [1, {MAX_REQUESTS}]")
    base = url.rstrip("/")
    info = _get(base + "/v1/models", api_key)["data"][0]
    reqs = generate(workload, info["vocab_size"], info["max_model_len"] - max_tokens)
    sem = threading.Semaphore(max_concurrency)
    results: list[dict] = []
    lock = threading.Lock()

    def worker(prompt):
        try:
            r = one_request(base, prompt, max_tokens, api_key, timeout_s)
        finally:
            sem.release()
        with lock:
            results.append(r)

    threads = []
    t0 = time.perf_counter()
    for r in reqs:
        delay = r.arrival - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        sem.acquire()
        th = threading.Thread(target=worker, args=(r.prompt,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout_s)
    wall = time.perf_counter() - t0
    ok = [r for r in results if not r["error"] and r["token_times"]]
    ttft = [r["token_times"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["token_times"], r["token_times"][1:])]
    tpot = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
            for r in ok if len(r["token_times"]) > 1]
    out_tokens = sum(len(r["token_times"]) for r in ok)

    def pct(xs):
        return {q: float(np.percentile(xs, int(q[1:]))) for q in ("p50", "p90", "p99")} if xs else {}

    summary = {
        "requests": len(reqs), "succeeded": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "wall_s": wall, "output_tokens": out_tokens, "gpus": gpus,
        "tps_per_gpu": out_tokens / wall / gpus,
        "tps_per_user": float(np.mean([1 / t for t in tpot if t > 0])) if tpot else None,
        "ttft_s": {"mean": float(np.mean(ttft)) if ttft else None, **pct(ttft)},
        "itl_s": {"mean": float(np.mean(itl)) if itl else None, **pct(itl)},
        "workload": workload.to_dict(), "max_tokens": max_tokens,
    }
    log(f"{len(ok)}/{len(reqs)} ok in {wall:.1f} s: {summary['tps_per_gpu']:.1f} output tok/s/GPU, "
        f"{summary['tps_per_user'] or 0:.1f} tok/s/user, TTFT p50 {summary['ttft_s'].get('p50', 0) * 1e3:.0f} ms")
    return summary
