"""``dwdp loadtest``: replay a workload against a running ``dwdp serve`` (loopback only).

Requests (lengths from a :class:`WorkloadSpec`, random token ids) are sent as streaming
completions at a Poisson rate (or all at once), at most ``max_concurrency`` in flight and
at most ``MAX_REQUESTS`` in total. Reported as ``vllm bench serve`` does: TTFT, TPOT (per
request, the mean gap after the first token), ITL (every gap between streamed chunks) and
E2E latency, each as mean / median / p90 / p99, and request and token throughput; plus the
paper's axes, output tokens/s per GPU and tokens/s per user (1 / TPOT).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import numpy as np

from ..errors import UserError
from ..workload import WorkloadSpec, generate

MAX_REQUESTS = 10_000
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
LATENCIES = (("ttft_s", "TTFT (time to first token)"), ("tpot_s", "TPOT (time per output token)"),
             ("itl_s", "ITL (inter-token latency)"), ("e2e_s", "E2E latency"))


def base_url(url: str) -> str:
    """The server's root: an OpenAI-style base URL ending in ``/v1`` is accepted too."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UserError(f"--url {url!r} is not an http URL; give the server's address, e.g. http://127.0.0.1:8000")
    if u.hostname not in LOOPBACK:
        raise UserError(f"dwdp loadtest only targets a server on this machine (127.0.0.1/localhost), not "
                        f"{u.hostname!r}; run it on the server's machine")
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _get(url: str, api_key: str | None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def server_info(base: str, api_key: str | None) -> dict:
    """The served model's entry of ``/v1/models``; a server that is not there, wants a key or
    is not a dwdp server is one :class:`UserError` line."""
    try:
        data = _get(base + "/v1/models", api_key)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise UserError(f"the server at {base} needs an API key: pass --api-key KEY or set DWDP_API_KEY"
                            + (" (the key given was refused)" if api_key else "")) from None
        raise UserError(f"GET {base}/v1/models answered HTTP {e.code}: is --url the address `dwdp serve` "
                        "printed (e.g. http://127.0.0.1:8000)?") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"no server answers at {base} ({reason}); start one with `dwdp serve` or give its "
                        "address with --url") from None
    except ValueError:
        raise UserError(f"{base}/v1/models did not answer JSON: is --url a dwdp serve address?") from None
    try:
        info = data["data"][0]
        return {"vocab_size": int(info["vocab_size"]), "max_model_len": int(info["max_model_len"])}
    except (KeyError, IndexError, TypeError, ValueError):
        raise UserError(f"{base}/v1/models lacks vocab_size/max_model_len: dwdp loadtest drives a dwdp serve, "
                        "not another server") from None


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


def latency_stats(xs: list[float]) -> dict:
    """mean / median / p90 / p99 (``p50`` too: the frontier files and the planner read it)."""
    if not xs:
        return {"mean": None, "median": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(xs, dtype=np.float64)
    med = float(np.median(a))
    return {"mean": float(a.mean()), "median": med, "p50": med,
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[dict], wall: float, gpus: int = 1) -> dict:
    """The load test's numbers from each request's start and token arrival times."""
    ok = [r for r in results if not r["error"] and r["token_times"]]
    ttft = [r["token_times"][0] - r["start"] for r in ok]
    e2e = [r["token_times"][-1] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["token_times"], r["token_times"][1:])]
    tpot = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
            for r in ok if len(r["token_times"]) > 1]
    out_tokens = sum(len(r["token_times"]) for r in ok)
    in_tokens = sum(r["prompt_len"] for r in ok)
    return {
        "requests": len(results), "succeeded": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "wall_s": wall, "input_tokens": in_tokens, "output_tokens": out_tokens, "gpus": gpus,
        "request_throughput": len(ok) / wall, "output_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall,
        "tps_per_gpu": out_tokens / wall / gpus,
        "tps_per_user": float(np.mean([1 / t for t in tpot if t > 0])) if any(t > 0 for t in tpot) else None,
        "ttft_s": latency_stats(ttft), "tpot_s": latency_stats(tpot), "itl_s": latency_stats(itl),
        "e2e_s": latency_stats(e2e),
    }


def run_loadtest(url: str, workload: WorkloadSpec, max_tokens: int, gpus: int = 1, max_concurrency: int = 64,
                 api_key: str | None = None, timeout_s: float = 600.0, log=print, keep_requests: bool = False) -> dict:
    """Run the load test; ``keep_requests`` adds each request's raw times (``requests_raw``)."""
    base = base_url(url)
    if not 1 <= workload.num_requests <= MAX_REQUESTS:
        raise UserError(f"--num-requests {workload.num_requests}: give 1 to {MAX_REQUESTS}")
    if max_tokens < 1 or max_concurrency < 1 or gpus < 1:
        raise UserError("--max-tokens, --max-concurrency and --gpus must each be at least 1")
    info = server_info(base, api_key)
    room = info["max_model_len"] - max_tokens
    if room < 1:
        raise UserError(f"--max-tokens {max_tokens} leaves no room for a prompt in the server's "
                        f"{info['max_model_len']}-token context; give fewer")
    if workload.dist != "trace" and workload.isl > room:
        raise UserError(f"--isl {workload.isl} plus --max-tokens {max_tokens} exceeds the server's context "
                        f"({info['max_model_len']} tokens); give --isl {room} or less")
    reqs = generate(workload, info["vocab_size"], room)
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
    with lock:
        done = list(results)
    summary = summarize(done, wall, gpus) | {"workload": workload.to_dict(), "max_tokens": max_tokens,
                                             "max_concurrency": max_concurrency}
    summary["requests"] = len(reqs)
    summary["failed"] = len(reqs) - summary["succeeded"]  # a request still hanging after timeout_s failed
    if keep_requests:
        summary["requests_raw"] = [{"start": r["start"], "token_times": r["token_times"],
                                    "prompt_len": r["prompt_len"], "error": r["error"]} for r in done]
    t = summary["ttft_s"]["p50"]
    log(f"{summary['succeeded']}/{len(reqs)} ok in {wall:.1f} s: {summary['tps_per_gpu']:.1f} output tok/s/GPU, "
        f"{summary['tps_per_user'] or 0:.1f} tok/s/user, TTFT p50 {(t or 0) * 1e3:.0f} ms")
    return summary


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def percentile_table(summary: dict):
    """A rich Table of the latencies (ms) and the throughputs, as ``vllm bench serve`` prints them."""
    from rich.table import Table

    t = Table(title=f"dwdp loadtest: {summary['succeeded']}/{summary['requests']} requests ok in "
                    f"{summary['wall_s']:.2f} s", title_justify="left")
    t.add_column("latency (ms)")
    for c in ("mean", "median", "p90", "p99"):
        t.add_column(c, justify="right")
    for key, name in LATENCIES:
        s = summary[key]
        t.add_row(name, *(_ms(s[c]) for c in ("mean", "median", "p90", "p99")))
    t.add_section()
    thr = [("request throughput (req/s)", summary["request_throughput"]),
           ("output token throughput (tok/s)", summary["output_throughput"]),
           ("total token throughput (tok/s)", summary["total_token_throughput"]),
           (f"output tok/s per GPU ({summary['gpus']} GPU)", summary["tps_per_gpu"]),
           ("tok/s per user (1 / TPOT)", summary["tps_per_user"])]
    for name, v in thr:
        t.add_row(name, "-" if v is None else f"{v:.2f}", "", "", "")
    return t
