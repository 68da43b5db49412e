"""``dwdp loadtest`` against a stub OpenAI-style streaming server: the percentile table and
the JSON agree with an independent numpy computation over the raw token arrival times;
the API key comes from DWDP_API_KEY; a base URL ending in /v1 works; a server that is not
there or refuses the key is one line."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO

import numpy as np
import pytest
from rich.console import Console

from dwdp.cli import main
from dwdp.serve.loadtest import percentile_table, run_loadtest
from dwdp.workload import WorkloadSpec

KEY = "sekrit"


class _Stub(BaseHTTPRequestHandler):
    """/v1/models and streaming /v1/completions; chunks of one or two tokens, small pauses
    that differ per request so the latencies spread."""

    def log_message(self, *a):
        pass

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {KEY}":
            return True
        body = b'{"error": {"message": "invalid API key"}}'
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return False

    def do_GET(self):
        if not self._authorised():
            return
        if self.path != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps({"data": [{"id": "stub", "vocab_size": 100, "max_model_len": 64}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if not self._authorised():
            return
        if self.path != "/v1/completions":
            self.send_error(404)
            return
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n, plen = req["max_tokens"], len(req["prompt"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(0.001 * (plen % 7))
        sent = 0
        while sent < n:
            k = min(2 if (plen + sent) % 3 == 0 else 1, n - sent)
            chunk = {"choices": [{"index": 0, "text": "", "token_ids": list(range(k))}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
            sent += k
            time.sleep(0.0005 * ((plen + sent) % 5))
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def stub():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _table_rows(summary) -> dict[str, list[str]]:
    buf = StringIO()
    Console(file=buf, width=200, color_system=None).print(percentile_table(summary))
    rows = {}
    for line in buf.getvalue().splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_table_and_json_match_numpy_over_the_raw_times(stub):
    wl = WorkloadSpec(num_requests=12, isl=20, dist="uniform", ratio=0.5, seed=4)
    s = run_loadtest(stub + "/v1", wl, 5, gpus=2, max_concurrency=4, api_key=KEY, log=lambda m: None,
                     keep_requests=True)
    raw = s["requests_raw"]
    assert s["succeeded"] == 12 and s["failed"] == 0 and len(raw) == 12
    # Independent of the implementation: straight from each request's start and token times.
    ttft = [r["token_times"][0] - r["start"] for r in raw]
    e2e = [r["token_times"][-1] - r["start"] for r in raw]
    tpot = [np.diff(r["token_times"]).mean() for r in raw]
    itl = np.concatenate([np.diff(r["token_times"]) for r in raw])
    want = {"ttft_s": ttft, "tpot_s": tpot, "itl_s": itl, "e2e_s": e2e}
    rows = _table_rows(s)
    labels = {"ttft_s": "TTFT", "tpot_s": "TPOT", "itl_s": "ITL", "e2e_s": "E2E"}
    for key, xs in want.items():
        ref = {"mean": np.mean(xs), "median": np.median(xs), "p90": np.percentile(xs, 90),
               "p99": np.percentile(xs, 99)}
        for stat, v in ref.items():
            assert s[key][stat] == pytest.approx(v, rel=1e-9, abs=1e-12), (key, stat)
        row = next(cells for name, cells in rows.items() if name.startswith(labels[key]))
        assert [float(c) for c in row] == pytest.approx([round(ref[k] * 1e3, 2) for k in ("mean", "median", "p90", "p99")],
                                                        abs=0.0051), key
    out_tokens = 12 * 5
    in_tokens = sum(r["prompt_len"] for r in raw)
    assert s["output_tokens"] == out_tokens and s["input_tokens"] == in_tokens
    assert s["request_throughput"] == pytest.approx(12 / s["wall_s"])
    assert s["output_throughput"] == pytest.approx(out_tokens / s["wall_s"])
    assert s["total_token_throughput"] == pytest.approx((in_tokens + out_tokens) / s["wall_s"])
    assert s["tps_per_gpu"] == pytest.approx(out_tokens / s["wall_s"] / 2)
    thr = next(cells for name, cells in rows.items() if name.startswith("request throughput"))
    assert float(thr[0]) == pytest.approx(round(12 / s["wall_s"], 2), abs=0.0051)


def test_cli_reads_the_key_from_the_environment_and_a_v1_url(stub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DWDP_API_KEY", KEY)
    out = tmp_path / "lt.json"
    assert main(["loadtest", "--url", stub + "/v1/", "--num-requests", "4", "--isl", "10", "--max-tokens", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["succeeded"] == 4 and data["output_tokens"] == 12 and "requests_raw" not in data
    for label, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL", "itl_s"), ("E2E", "e2e_s")):
        line = next(ln for ln in text.splitlines() if label in ln)
        nums = [float(x) for x in re.findall(r"\d+\.\d+", line)]
        assert nums == pytest.approx([round(data[key][k] * 1e3, 2) for k in ("mean", "median", "p90", "p99")],
                                     abs=0.0051)


def test_no_server_or_a_refused_key_is_one_line(stub, monkeypatch, capsys):
    monkeypatch.delenv("DWDP_API_KEY", raising=False)
    assert main(["loadtest", "--url", stub, "--num-requests", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("dwdp loadtest: error: the server at") and "--api-key" in err and "DWDP_API_KEY" in err
    assert main(["loadtest", "--url", stub, "--api-key", "wrong", "--num-requests", "2"]) == 2
    assert "the key given was refused" in capsys.readouterr().err
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert main(["loadtest", "--url", f"http://127.0.0.1:{free}/v1", "--num-requests", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no server answers" in err and "dwdp serve" in err and "--url" in err
    monkeypatch.setenv("DWDP_API_KEY", KEY)
    assert main(["loadtest", "--url", stub, "--isl", "62", "--max-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "--isl 62" in err and "64 tokens" in err and "--isl 61 or less" in err
