"""The HTTP server end to end on CPU: OpenAI-compatible completions against transformers'
generate, streaming, errors with reasons, back-pressure, a crashed worker, shutdown,
metrics, the load generator, and hostile clients (every hostile case found so far)."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import httpx
import pytest
import torch

from dwdp.serve.loadtest import run_loadtest
from dwdp.serve.server import Server
from dwdp.serve.text import Detokenizer, TextStream, load_tokenizer
from dwdp.serve.worker import ServingWorker
from dwdp.workload import WorkloadSpec


def _server(model, tokenizer=None, server_kw=None, **kw):
    api_key = kw.pop("api_key", None)
    srv = Server(ServingWorker(model, **kw), "tiny", "127.0.0.1", 0, tokenizer, api_key, **(server_kw or {}))
    srv.start()
    return srv, f"http://127.0.0.1:{srv.port}"


def _post(url, obj, key=None, raw=None, path="/v1/completions"):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=raw if raw is not None else json.dumps(obj).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _get(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _sse(url, obj, path="/v1/completions"):
    with httpx.Client(timeout=60) as c, c.stream("POST", url + path, json=obj | {"stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def _wait_for(cond, timeout=20.0, what="condition"):
    """Bounded polling instead of sleeps: returns as soon as cond() holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _metric(url, name):
    text = _get(url, "/metrics")[1]
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    return vals.get(name)


def _raw(port, data: bytes, timeout=60.0) -> tuple[bytes, bool]:
    """Send raw bytes; read until the server closes the connection. Returns (reply, whether
    the server closed it; False: our own generous timeout ran out first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        out = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    return out, True
                out += b
        except ConnectionResetError:
            return out, True
        except socket.timeout:
            return out, False


def _gate(worker):
    """Make decode steps wait for a gate (tests control exactly when tokens come)."""
    gate, fwd = threading.Event(), worker.decode._launch

    def gated(batch):
        assert gate.wait(30), "gate never opened"
        return fwd(batch)

    worker.decode._launch = gated
    return gate


def _greedy_ref(ref, prompt, n):
    return ref.hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def served(ref_cases):
    ref = ref_cases["qwen3_moe"]
    srv, url = _server(ref.ours(), max_num_tokens=32, max_batch=4)
    yield ref, url, srv
    srv.shutdown(5)


def test_completion_matches_transformers(served):
    ref, url, _ = served
    prompts = [[5, 9, 2, 7, 1, 3], list(range(40, 90))]
    outs = [None] * len(prompts)

    def go(i):  # concurrent: batched prefill (50 > MNT 32: chunked) and batched decode
        outs[i] = _post(url, {"prompt": prompts[i], "max_tokens": 8, "temperature": 0})

    ths = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    for p, (code, body) in zip(prompts, outs):
        assert code == 200, body
        res = json.loads(body)
        want = _greedy_ref(ref, p, 8)
        assert res["choices"][0]["token_ids"] == want
        assert res["choices"][0]["text"] == "".join(f"<{t}>" for t in want)  # no tokenizer: ids spelled out
        assert res["choices"][0]["finish_reason"] == "length"
        assert res["usage"] == {"prompt_tokens": len(p), "completion_tokens": 8, "total_tokens": len(p) + 8}


def test_streaming(served):
    _, url, _ = served
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json={
            "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert len(tokens) == 5 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage (OpenAI)
    code, body = _post(url, {"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0})
    assert json.loads(body)["choices"][0]["token_ids"] == tokens
    chunks = _sse(url, {"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0,
                        "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]] == tokens


@pytest.mark.parametrize("body,msg,param", [
    (b"{bad", "malformed JSON", None), (b"[1, 2]", "JSON object", None),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply", None),
    (json.dumps({"prompt": "hello"}).encode(), "without a tokenizer", "prompt"),
    (json.dumps({"prompt": []}).encode(), "non-empty list", "prompt"),
    (json.dumps({"prompt": [1], "temperature": -1}).encode(), "greater than or equal to 0", "temperature"),
    (b'{"prompt": [1], "temperature": NaN}', "finite number", "temperature"),
    (b'{"prompt": [1], "top_p": Infinity}', "finite number", "top_p"),
    (json.dumps({"prompt": [1], "top_p": 0}).encode(), "greater than 0", "top_p"),
    (json.dumps({"prompt": [1], "max_tokens": "many"}).encode(), "valid integer", "max_tokens"),
    (json.dumps({"prompt": [1], "max_tokens": 4000}).encode(), "exceeds the model's context", "max_tokens"),
    (json.dumps({"prompt": [10 ** 6]}).encode(), "token ids must lie", "prompt"),
    (json.dumps({"prompt": [True, 2]}).encode(), "not bool", "prompt"),
    (json.dumps({"prompt": [1.0]}).encode(), "not float", "prompt"),
    (json.dumps({"prompt": [1], "seed": 2 ** 64}).encode(), "less than or equal to", "seed"),
    (json.dumps({"prompt": [1], "stream": "yes"}).encode(), "valid boolean", "stream"),
    (json.dumps({"prompt": [1], "n": 0}).encode(), "greater than or equal to 1", "n"),
    (json.dumps({"prompt": [1], "n": 2, "best_of": 3}).encode(), "best_of must equal n", "best_of"),
    (json.dumps({"prompt": [1], "stop": ["a", "b", "c", "d", "e"]}).encode(), "at most 4", "stop"),
    (json.dumps({"prompt": [1], "stream_options": {"include_usage": True}}).encode(), "only allowed with stream",
     "stream_options"),
    (json.dumps({"prompt": [1], "best_of_n": 2}).encode(), "unsupported field", "best_of_n"),
    (json.dumps({"prompt": [1], "suffix": "x"}).encode(), "suffix", "suffix"),
    (json.dumps({"prompt": [1], "logit_bias": {"320": 1}}).encode(), "logit_bias", "logit_bias"),
    (json.dumps({"prompt": [1], "logit_bias": {"a": 1}}).encode(), "token ids", "logit_bias"),
    (json.dumps({"prompt": [1], "logit_bias": {"3": 101}}).encode(), "[-100, 100]", "logit_bias"),
    (json.dumps({"prompt": [1], "max_tokens": 2, "min_tokens": 3}).encode(), "min_tokens", "min_tokens"),
    (json.dumps({"prompt": [1], "presence_penalty": 3}).encode(), "less than or equal to 2", "presence_penalty"),
    (json.dumps({"prompt": [1], "repetition_penalty": 0}).encode(), "greater than 0", "repetition_penalty"),
])
def test_bad_requests_get_400_with_reason(served, body, msg, param):
    _, url, _ = served
    code, text = _post(url, None, raw=body)
    err = json.loads(text)["error"]
    assert code == 400 and msg in err["message"], err
    assert err["param"] == param and err["type"] == "invalid_request_error" and isinstance(err["code"], str)


def test_one_request_never_takes_the_server_down(served):
    """Hostile requests: each used to crash the loop (500, then 503 until restart)."""
    ref, url, _ = served
    greedy = _greedy_ref(ref, [1, 2, 3], 4)
    for extra in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}):  # degenerate to greedy
        code, body = _post(url, {"prompt": [1, 2, 3], "max_tokens": 4} | extra)
        assert code == 200 and json.loads(body)["choices"][0]["token_ids"] == greedy, body
    for seed in (2 ** 63, 2 ** 64 - 1, -(2 ** 63)):  # 64-bit seeds, signed or not, sample reproducibly
        runs = [_post(url, {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 1.0, "seed": seed}) for _ in "ab"]
        assert [c for c, _ in runs] == [200, 200], runs
        assert json.loads(runs[0][1])["choices"][0]["token_ids"] == json.loads(runs[1][1])["choices"][0]["token_ids"]
    assert _post(url, None, raw=b'{"prompt": [1, 2, 3], "max_tokens": 4, "temperature": NaN}')[0] == 400
    assert _get(url, "/health") == (200, '{"status":"ok"}')
    code, body = _post(url, {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0})
    assert json.loads(body)["choices"][0]["token_ids"] == greedy


def test_fuzzed_requests_never_500(served):
    """A bounded fuzz: 150 random bodies, none may give a 5xx or hurt later requests."""
    ref, url, _ = served
    rng = random.Random(14)
    values = [None, True, False, 0, 1, -1, 2 ** 63, 2 ** 64, -(2 ** 70), 1e-300, 1e300, 0.5, "x", "", [], {}, [1, 2],
              [True], [[1]], [[1], [2]], ["a"], {"include_usage": True}, 3.5, [-1], [319], [320]]
    fields = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stop", "n", "echo",
              "logprobs", "eos_token_id", "stream_options", "user", "model"]
    for _ in range(150):
        body = {"prompt": rng.choice([[1, 2], [5], rng.choice(values)])}
        for f in rng.sample(fields, rng.randint(0, 4)):
            body[f] = rng.choice(values)
        body["max_tokens"] = body.get("max_tokens") if rng.random() < 0.5 else 2
        body.pop("stream", None)  # streaming has its own tests; a 200 SSE body is not JSON
        code, text = _post(url, body)
        # 404: a "model" that is not the served one's name (model_not_found)
        assert code in (200, 400) or (code == 404 and body.get("model") != "tiny"), (body, code, text)
        if code != 200:
            assert json.loads(text)["error"]["message"]
    assert _get(url, "/health")[0] == 200
    assert json.loads(_post(url, {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0})[1])[
        "choices"][0]["token_ids"] == _greedy_ref(ref, [1, 2, 3], 4)


def test_conformance_routes_and_errors(served):
    _, url, _ = served
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.get("/v1/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        for method in ("PUT", "PATCH"):
            r = c.request(method, "/v1/completions", json={})
            assert r.status_code == 405 and r.headers["content-type"] == "application/json"
        r = c.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_stop_echo_logprobs(served):
    ref, url, _ = served
    greedy = _greedy_ref(ref, [5, 9, 2], 8)
    stop = f"<{greedy[3]}>"
    first = greedy.index(greedy[3])
    res = json.loads(_post(url, {"prompt": [5, 9, 2], "max_tokens": 8, "temperature": 0, "stop": [stop]})[1])
    ch = res["choices"][0]
    assert ch["finish_reason"] == "stop" and ch["text"] == "".join(f"<{t}>" for t in greedy[:first])
    chunks = _sse(url, {"prompt": [5, 9, 2], "max_tokens": 8, "temperature": 0, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == ch["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    res = json.loads(_post(url, {"prompt": [5, 9, 2], "max_tokens": 2, "temperature": 0, "echo": True})[1])
    assert res["choices"][0]["text"] == "<5><9><2>" + "".join(f"<{t}>" for t in greedy[:2])
    res = json.loads(_post(url, {"prompt": [5, 9, 2], "max_tokens": 3, "temperature": 0, "logprobs": 3})[1])
    lp = res["choices"][0]["logprobs"]
    with torch.no_grad():
        logits = ref.hf(torch.tensor([[5, 9, 2]])).logits[0, -1]
    want = torch.log_softmax(logits.double(), -1)
    assert lp["tokens"] == [f"<{t}>" for t in greedy[:3]]
    assert lp["token_logprobs"][0] == pytest.approx(float(want[greedy[0]]), abs=1e-4)
    top = sorted(lp["top_logprobs"][0].values(), reverse=True)
    assert len(lp["top_logprobs"][0]) == 3 and top[0] == pytest.approx(float(want.max()), abs=1e-4)
    assert lp["text_offset"] == [0, len(f"<{greedy[0]}>"), len(f"<{greedy[0]}><{greedy[1]}>")]


def test_text_stream_holds_back_possible_stops():
    ts = TextStream(Detokenizer(None), ["<7><8>"])
    assert ts.add([1]) == "<1>" and ts.add([7]) == ""  # "<7>" could start the stop string
    assert ts.add([9]) == "<7><9>" and ts.finish() == "" and not ts.stopped
    ts = TextStream(Detokenizer(None), ["<7><8>"])
    assert ts.add([1]) + ts.add([7]) + ts.add([8]) == "<1>" and ts.stopped
    ts = TextStream(Detokenizer(None), ["<7>"], min_tokens=3)  # vLLM: no stop before min_tokens
    assert ts.add([7]) + ts.add([1]) == "<7><1>" and not ts.stopped
    assert ts.add([7]) == "" and ts.stopped and ts.text == "<7><1>"


def test_unseeded_requests_get_their_own_randomness(served):
    _, url, _ = served
    outs = {tuple(json.loads(_post(url, {"prompt": [1, 2, 3], "max_tokens": 6, "temperature": 1.0})[1])
                  ["choices"][0]["token_ids"]) for _ in range(5)}
    assert len(outs) > 1  # all equal was the bug: every unseeded request drew from seed 0
    seeded = [json.loads(_post(url, {"prompt": [1, 2, 3], "max_tokens": 6, "temperature": 1.0, "seed": 7})[1])
              ["choices"][0]["token_ids"] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_routes_health_metrics(served):
    _, url, _ = served
    assert _get(url, "/nope")[0] == 404
    assert json.loads(_get(url, "/health")[1]) == {"status": "ok"}
    info = json.loads(_get(url, "/v1/models")[1])["data"][0]
    assert info["vocab_size"] == 320 and info["max_model_len"] == 2048
    before = _metric(url, "dwdp_generation_tokens_total")
    reqs = _metric(url, "dwdp_requests_total")
    ttft = _metric(url, "dwdp_time_to_first_token_seconds_count")
    prefills = _metric(url, "dwdp_prefill_step_seconds_count")
    decodes = _metric(url, "dwdp_decode_step_seconds_count")
    _post(url, {"prompt": [4, 5], "max_tokens": 3})
    assert _metric(url, "dwdp_prefill_step_seconds_count") == prefills + 1  # a 2-token prompt: one step
    assert _metric(url, "dwdp_decode_step_seconds_count") >= decodes + 2  # tokens 2 and 3
    assert _metric(url, "dwdp_decode_step_seconds_sum") > 0
    assert _metric(url, "dwdp_requests_total") == reqs + 1
    assert _metric(url, "dwdp_generation_tokens_total") == before + 3
    assert _metric(url, "dwdp_time_to_first_token_seconds_count") == ttft + 1
    assert _metric(url, 'dwdp_time_to_first_token_seconds_bucket{le="+Inf"}') == ttft + 1
    assert _metric(url, "dwdp_inter_token_latency_seconds_sum") > 0


def test_queue_depth_metric_tracks_waiting_requests(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours(), max_batch=1)
    gate = _gate(srv.worker)
    try:
        ths = [threading.Thread(target=_post, args=(url, {"prompt": [1, 2, i], "max_tokens": 2})) for i in range(3)]
        for t in ths:
            t.start()
        # One request in the decode batch (blocked), two waiting for a slot.
        _wait_for(lambda: _metric(url, "dwdp_queue_depth") == 2 and _metric(url, "dwdp_running_requests") == 1,
                  what="queue depth 2")
        gate.set()
        for t in ths:
            t.join(30)
        _wait_for(lambda: _metric(url, "dwdp_queue_depth") == 0, what="queue depth 0")
    finally:
        gate.set()
        srv.shutdown(5)


def test_api_key(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours(), api_key="sekret")
    try:
        assert _post(url, {"prompt": [1], "max_tokens": 1})[0] == 401
        code, body = _post(url, {"prompt": [1], "max_tokens": 1}, key="wrong")
        assert code == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert _post(url, {"prompt": [1], "max_tokens": 1}, key="sekret")[0] == 200
        assert _get(url, "/metrics")[0] == 401
        assert _get(url, "/health")[0] == 200  # probes need no key
    finally:
        srv.shutdown(5)


def test_full_queue_gets_429_and_nothing_hangs(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours(), max_queue=1)
    gate = _gate(srv.worker)
    try:
        first = threading.Thread(target=_post, args=(url, {"prompt": [1, 2], "max_tokens": 40}))
        first.start()
        _wait_for(lambda: srv.worker.in_flight() == 1, what="the first request admitted")
        with httpx.Client(timeout=30) as c:
            r = c.post(url + "/v1/completions", json={"prompt": [3], "max_tokens": 2})
        assert r.status_code == 429 and "limit 1" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        gate.set()
        first.join(30)
        assert not first.is_alive()
        assert _post(url, {"prompt": [3], "max_tokens": 2})[0] == 200  # capacity is back
    finally:
        gate.set()
        srv.shutdown(5)


def test_disconnect_cancels_and_frees_the_slot(ref_cases):
    """Dropped streams (and a dropped non-streaming request) free their slots at once."""
    srv, url = _server(ref_cases["qwen3_moe"].ours(), max_queue=2)
    try:
        for _ in range(2):
            with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/completions", json={
                    "prompt": [1, 2], "max_tokens": 400, "stream": True}) as r:
                next(r.iter_lines())  # a first token arrived; now hang up
        _wait_for(lambda: srv.worker.in_flight() == 0 and not srv.worker.decode.has_work, timeout=10,
                  what="dropped streams cancelled")
        gen = _metric(url, "dwdp_generation_tokens_total")
        assert gen < 2 * 400 and _metric(url, "dwdp_requests_cancelled_total") == 2
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 400}, timeout=0.5)
        _wait_for(lambda: srv.worker.in_flight() == 0 and not srv.worker.decode.has_work, timeout=10,
                  what="dropped request cancelled")
        assert _metric(url, "dwdp_requests_cancelled_total") == 3
        assert _post(url, {"prompt": [3], "max_tokens": 2})[0] == 200  # no 429: the slots are free
    finally:
        srv.shutdown(5)


def test_hostile_connections_are_answered_or_cut(ref_cases):
    """The deadlines are injected short (0.2 s) and the client waits far longer (60 s): a
    connection the server closes was cut by its deadline, with no timing assumed."""
    srv, url = _server(ref_cases["qwen3_moe"].ours(), server_kw={"header_timeout_s": 0.2, "body_timeout_s": 0.2})
    port = srv.port
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    try:
        for cl in (b"abc", b"1e3", b"-1"):  # a bad Content-Length: 400, and the connection is closed
            out, closed = _raw(port, head + b"Content-Length: " + cl + b"\r\n\r\n{}")
            assert out.startswith(b"HTTP/1.1 400") and closed, out
        # A body shorter than its Content-Length: 408 once the body deadline passes.
        out, closed = _raw(port, head + b"Content-Length: 100\r\n\r\n{\"prompt\"")
        assert out.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.2 s" in out and closed, out
        # Headers that never finish, or nothing at all: cut by the header deadline, no reply.
        assert _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n") == (b"", True)
        assert _raw(port, b"") == (b"", True)
        # A TLS ClientHello on the plain-HTTP port: refused.
        hello = bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
        out, closed = _raw(port, hello)
        assert closed and (out == b"" or out.startswith(b"HTTP/1.1 400"))
        assert _get(url, "/health")[0] == 200
    finally:
        srv.shutdown(5)


def test_many_concurrent_clients(served):
    """Bounded concurrency: 24 streaming clients and a burst of 100 connects, no resets."""
    _, url, srv = served
    errors, lengths = [], []

    def client(i):
        try:
            chunks = _sse(url, {"prompt": [1 + i % 50, 2], "max_tokens": 6, "temperature": 0})
            lengths.append(sum(len(c["choices"][0]["token_ids"]) for c in chunks))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    ths = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in ths:
        t.start()
    socks = []
    try:
        for _ in range(100):  # more connects than the old backlog of 5
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            socks.append(s)
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for s in socks:
            assert s.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()
    for t in ths:
        t.join(60)
    assert not errors and lengths == [6] * 24, errors


def test_one_engine_fault_fails_its_requests_only(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours())
    fwd, calls = srv.worker.decode._launch, []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated transient fault")
        return fwd(batch)

    srv.worker.decode._launch = flaky
    try:
        code, body = _post(url, {"prompt": [1, 2, 3], "max_tokens": 4})
        err = json.loads(body)["error"]
        assert code == 500 and "simulated transient fault" in err["message"] and err["code"] == "generation_failed"
        assert _get(url, "/health")[0] == 200
        assert _post(url, {"prompt": [1, 2, 3], "max_tokens": 4})[0] == 200
        chunks = _sse(url, {"prompt": [1, 2], "max_tokens": 2})
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        srv.shutdown(2)


def test_error_inside_a_stream_has_a_code(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours())
    srv.worker.decode._launch = lambda batch: (_ for _ in ()).throw(RuntimeError("boom in stream"))
    try:
        chunks = _sse(url, {"prompt": [1, 2], "max_tokens": 4})
        err = chunks[-1]["error"]
        assert "boom in stream" in err["message"] and err["code"] == "generation_failed" and err["type"]
    finally:
        srv.shutdown(2)


def test_crashed_worker_fails_requests_loudly(ref_cases):
    """A fault that persists (a broken device) takes the worker down after a few steps."""
    srv, url = _server(ref_cases["qwen3_moe"].ours(), max_engine_faults=2)

    def boom(batch):
        raise RuntimeError("simulated device fault")

    srv.worker.decode._launch = boom
    try:
        for _ in range(2):
            code, body = _post(url, {"prompt": [1, 2, 3], "max_tokens": 4})
            assert code == 500 and "simulated device fault" in body
        _wait_for(lambda: _get(url, "/health")[0] == 503, timeout=5, what="health 503")
        code, body = _get(url, "/health")
        assert "decode engine steps failed in a row" in body and "simulated device fault" in body
        assert _post(url, {"prompt": [1], "max_tokens": 2})[0] == 503
    finally:
        srv.shutdown(2)


def test_graceful_shutdown_finishes_in_flight(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours())
    out = {}
    th = threading.Thread(target=lambda: out.update(r=_post(url, {"prompt": [1, 2], "max_tokens": 30})))
    th.start()
    _wait_for(lambda: _metric(url, "dwdp_generation_tokens_total") >= 1, what="generation started")
    stopper = threading.Thread(target=srv.shutdown, args=(30,))
    stopper.start()
    _wait_for(lambda: srv.worker._draining, what="draining")
    assert _post(url, {"prompt": [1], "max_tokens": 1})[0] == 503  # no new work while draining
    th.join(30)
    stopper.join(30)
    assert out["r"][0] == 200 and len(json.loads(out["r"][1])["choices"][0]["token_ids"]) == 30


def test_drain_timeout_ends_long_streams_with_a_reason(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours(), server_kw={"drain_timeout_s": 0.3})
    fwd = srv.worker.decode._launch

    def slow(batch):  # 300 tokens take >= 6 s: far past the drain timeout
        time.sleep(0.02)
        return fwd(batch)

    srv.worker.decode._launch = slow
    got = {}
    th = threading.Thread(target=lambda: got.update(chunks=_sse(url, {"prompt": [1, 2], "max_tokens": 300})))
    th.start()
    _wait_for(lambda: _metric(url, "dwdp_generation_tokens_total") >= 1, what="streaming")
    srv.shutdown()  # the configured drain timeout, 0.3 s: the stream (>= 6 s of steps) cannot finish
    th.join(30)
    assert not th.is_alive()
    err = got["chunks"][-1]["error"]
    assert "shut down before this request finished (drain timeout 0.3 s)" in err["message"]
    assert 1 <= sum(len(c["choices"][0]["token_ids"]) for c in got["chunks"][:-1]) < 300


def test_loadtest_against_server(served):
    _, url, _ = served
    s = run_loadtest(url, WorkloadSpec(num_requests=6, isl=20, dist="uniform", ratio=0.5, rate=50.0), 4,
                     log=lambda m: None)
    assert s["succeeded"] == 6 and s["failed"] == 0 and s["output_tokens"] == 24
    assert s["tps_per_gpu"] > 0 and s["tps_per_user"] > 0 and s["ttft_s"]["p50"] > 0
    with pytest.raises(ValueError, match="only targets a server on this machine"):
        run_loadtest("http://10.0.0.1:8000", WorkloadSpec(num_requests=1), 1)


def test_loadtest_sweep_draws_the_frontier(served, tmp_path, capsys):
    """``dwdp loadtest --sweep-concurrency`` writes one frontier file;
    ``dwdp report`` plots it and tabulates it."""
    import json

    from dwdp.cli import main

    _, url, _ = served
    out = tmp_path / "front.json"
    assert main(["loadtest", "--url", url, "--num-requests", "6", "--isl", "12", "--max-tokens", "3",
                 "--sweep-concurrency", "1,3", "--label", "tiny-cpu", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["kind"] == "frontier" and d["label"] == "tiny-cpu"
    assert [p["max_concurrency"] for p in d["points"]] == [1, 3]
    assert all(p["succeeded"] == 6 and p["output_tokens"] == 18 and p["tps_per_user"] > 0 for p in d["points"])
    assert main(["report", str(out), "-o", str(tmp_path / "rep")]) == 0
    png = tmp_path / "rep" / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    capsys.readouterr()
    assert main(["report", str(out), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.count("| tiny-cpu |") == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "frontier", "label": "x", "points": [{"tps_per_gpu": 1}]}))
    assert main(["report", str(bad), "--markdown"]) == 2  # names the missing field


def _word_tokenizer(tmp_path, chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(320)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(tmp_path)
    return load_tokenizer(str(tmp_path))  # what `dwdp serve --model <checkpoint dir>` does


def test_text_prompts_with_a_tokenizer(ref_cases, tmp_path):
    """A checkpoint with a Hugging Face tokenizer accepts text and returns text."""
    assert load_tokenizer(str(tmp_path.parent / "missing")) is None
    srv, url = _server(ref_cases["qwen3_moe"].ours(), _word_tokenizer(tmp_path))
    try:
        code, body = _post(url, {"prompt": "t5 t9 t2 t7", "max_tokens": 4, "temperature": 0})
        assert code == 200, body
        by_text = json.loads(body)["choices"][0]
        by_ids = json.loads(_post(url, {"prompt": [5, 9, 2, 7], "max_tokens": 4, "temperature": 0})[1])["choices"][0]
        assert by_text["token_ids"] == by_ids["token_ids"]
        assert by_text["text"].split() == [f"t{i}" for i in by_text["token_ids"]]
    finally:
        srv.shutdown(5)


def test_chat_completions_with_the_chat_template(ref_cases, tmp_path):
    ref = ref_cases["qwen3_moe"]
    template = "{% for m in messages %}t1 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t2{% endif %}"
    srv, url = _server(ref.ours(), _word_tokenizer(tmp_path, template))
    msgs = [{"role": "system", "content": "t7"}, {"role": "user", "content": "t5 t9"}]
    ids = [1, 7, 1, 5, 9, 2]  # what the template renders, tokenized
    try:
        code, body = _post(url, {"messages": msgs, "max_tokens": 4, "temperature": 0, "logprobs": True,
                                 "top_logprobs": 2}, path="/v1/chat/completions")
        assert code == 200, body
        res = json.loads(body)
        want = _greedy_ref(ref, ids, 4)
        ch = res["choices"][0]
        assert res["object"] == "chat.completion" and ch["message"]["role"] == "assistant"
        assert ch["message"]["content"].split() == [f"t{i}" for i in want]
        assert [e["token"] for e in ch["logprobs"]["content"]] == [f"t{i}" for i in want]
        assert all(len(e["top_logprobs"]) == 2 for e in ch["logprobs"]["content"])
        assert res["usage"]["prompt_tokens"] == len(ids)
        chunks = _sse(url, {"messages": msgs, "max_tokens": 4, "temperature": 0}, path="/v1/chat/completions")
        assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).split() == [f"t{i}" for i in want]
        code, body = _post(url, {"messages": [{"role": "wizard", "content": "x"}]}, path="/v1/chat/completions")
        assert code == 400 and json.loads(body)["error"]["param"] == "messages.0.role"
    finally:
        srv.shutdown(5)


def test_cpu_serving_loop_runs_single_threaded(ref_cases):
    """On CPU the serving loop computes with one intra-op thread by default.
    With a thread pool every one of a decode step's hundreds of tiny ops ends on a
    barrier that waits for each pool thread to get a core; once the cores are shared
    (HTTP threads, clients, anything else on the box) steps went from 0.07 s to seconds
    and 64-client throughput fell ~20x on some runs. Asserted on the thread count the
    model's forward actually sees in the serving thread, not on time."""
    from dwdp.sampling import SamplingParams
    from dwdp.serve.worker import ServeRequest

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what a 2-core box gives by default; the loop must not inherit it
    try:
        for want, kw in ((1, {}), (2, {"intra_op_threads": 2})):
            model = ref_cases["qwen3_moe"].ours()
            seen = []
            # the embedding runs once per prefill forward and once per decode step
            hook = model.model.embed_tokens.register_forward_pre_hook(
                lambda m, a: seen.append(torch.get_num_threads()))
            worker = ServingWorker(model, max_num_tokens=64, max_batch=4, **kw)
            worker.start()
            try:
                req = worker.submit(ServeRequest([1, 2, 3, 4], SamplingParams(max_tokens=4)))
                events = []
                while not events or events[-1][0] == "token":
                    events.append(req.events.get(timeout=30))
                assert events[-1] == ("done", "length")
            finally:
                worker.stop(5)
                hook.remove()
            assert len(seen) == 4 and set(seen) == {want}, (kw, seen)  # 1 prefill + 3 decode forwards
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="intra_op_threads"):
        ServingWorker(ref_cases["qwen3_moe"].ours(), intra_op_threads=0)


def test_sigterm_that_lands_on_another_thread_still_stops_the_server(tmp_path):
    """A process-wide SIGTERM is delivered to whichever thread the kernel picks; Python runs
    the handler on the main thread only. The server's main thread must not sit in a wait
    that only a signal to itself ends (on an H200 the server ignored SIGTERM: most of its
    threads are CUDA's, torch's and the HTTP loop's)."""
    import subprocess
    import sys

    script = tmp_path / "serve_and_signal.py"
    script.write_text(
        "import signal, threading, time\n"
        "from dwdp.presets import resolve_model\n"
        "from dwdp.models import build_model, init_random\n"
        "from dwdp.serve.server import Server\n"
        "from dwdp.serve.worker import ServingWorker\n"
        "cfg, _ = resolve_model('tiny-qwen3-moe', None)\n"
        "model = build_model(cfg, __import__('torch').float32, 'cpu')\n"
        "init_random(model, 0)\n"
        "srv = Server(ServingWorker(model), 'tiny', '127.0.0.1', 0)\n"
        "def other():  # a thread of the process, not the main one, takes the signal\n"
        "    while not srv.uv.started:\n"
        "        time.sleep(0.05)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        "threading.Thread(target=other, daemon=True).start()\n"
        "srv.serve_until_signal()\n"
        "print('stopped', flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "stopped" in out.stdout, out.stderr[-2000:]


def test_request_log_line(served, caplog):
    _, url, _ = served
    caplog.set_level(logging.INFO, logger="dwdp.serve")
    res = json.loads(_post(url, {"prompt": [4, 5], "max_tokens": 3, "temperature": 0})[1])
    chunks = _sse(url, {"prompt": [4, 5, 6], "max_tokens": 2, "temperature": 0})

    def line(rid):
        return next((r.getMessage() for r in caplog.records if r.getMessage().startswith(rid + ":")), None)

    _wait_for(lambda: line(chunks[0]["id"]) is not None, what="the stream's log line")
    assert line(res["id"]).startswith(f"{res['id']}: length, prompt 2 tok, output 3 tok, TTFT ")
    assert line(chunks[0]["id"]).startswith(f"{chunks[0]['id']}: length, prompt 3 tok, output 2 tok, TTFT ")
    assert all(r.levelno == logging.INFO for r in caplog.records if r.getMessage().startswith("cmpl-"))


def test_periodic_stats_log_and_health_changes(served):
    """A fake clock: the throughput line's rates are exact (counter deltas over the interval)."""
    from dwdp.serve.server import StatsLog

    _, url, srv = served
    now, lines = [100.0], []

    class Log:
        def info(self, fmt, *a):
            lines.append(("info", fmt % a))

        def warning(self, fmt, *a):
            lines.append(("warning", fmt % a))

    stats = StatsLog(srv.worker, interval_s=5.0, clock=lambda: now[0], log=Log())
    assert stats.tick() is None  # not yet an interval
    _post(url, {"prompt": [4, 5], "max_tokens": 3, "temperature": 0})
    now[0] += 5.0
    line = stats.tick()
    assert line.startswith("prompt throughput 0.4 tok/s, generation throughput 0.6 tok/s, running 0, waiting 0, "
                           "KV cache 0.0% (0/4 slots)"), line
    now[0] += 5.0
    assert stats.tick() is None  # idle: no line
    srv.worker.degraded = "prefill group down (prefill rank 1 failed: killed)"
    try:
        stats.tick()
    finally:
        srv.worker.degraded = None
    stats.tick()
    assert lines[-2:] == [("warning", "server health: degraded: prefill group down (prefill rank 1 failed: killed)"),
                          ("info", "server health: ok (was degraded)")]


def test_tokens_per_second_is_a_recent_window():
    from dwdp.serve.metrics import RateWindow

    now = [0.0]
    w = RateWindow(10.0, clock=lambda: now[0])
    now[0] = 1.0
    w.add(30)
    now[0] = 4.0
    w.add(20)
    now[0] = 5.0
    assert w.rate() == 10.0  # 50 tokens over the 5 s since it started
    now[0] = 12.0
    assert w.rate() == 2.0  # the 30 at t=1 left the window: 20 over 10 s
    now[0] = 14.0
    assert w.rate() == 0.0  # idle for a window: 0, not the last value
    assert w.total == 50


def test_tokens_per_second_gauge_falls_to_zero_when_idle(served):
    _, url, srv = served
    _post(url, {"prompt": [4, 5], "max_tokens": 3, "temperature": 0})
    assert _metric(url, "dwdp_tokens_per_second") > 0
    clock = srv.worker.generated.clock
    srv.worker.generated.clock = lambda: clock() + 11.0  # a scrape 11 s later, with nothing generated since
    try:
        assert _metric(url, "dwdp_tokens_per_second") == 0.0
    finally:
        srv.worker.generated.clock = clock


def test_second_signal_forces_the_exit(tmp_path):
    """The first SIGINT drains (and says so, with the drain timeout); the second ends the
    drain at once: the running request fails with a reason instead of running to its end."""
    import subprocess
    import sys

    script = tmp_path / "serve_and_interrupt.py"
    script.write_text(
        "import os, signal, threading, time\n"
        "import torch\n"
        "from dwdp.presets import resolve_model\n"
        "from dwdp.models import build_model, init_random\n"
        "from dwdp.sampling import SamplingParams\n"
        "from dwdp.serve.server import Server\n"
        "from dwdp.serve.worker import ServeRequest, ServingWorker\n"
        "cfg, _ = resolve_model('tiny-qwen3-moe', None)\n"
        "model = build_model(cfg, torch.float32, 'cpu')\n"
        "init_random(model, 0)\n"
        "w = ServingWorker(model)\n"
        "srv = Server(w, 'tiny', '127.0.0.1', 0, drain_timeout_s=600)\n"
        "fwd = w.decode._launch\n"
        "def slow(batch):  # 400 tokens: 20 s of steps, far more than this test waits for\n"
        "    time.sleep(0.05)\n"
        "    return fwd(batch)\n"
        "w.decode._launch = slow\n"
        "def driver():\n"
        "    while not srv.uv.started:\n"
        "        time.sleep(0.02)\n"
        "    req = w.submit(ServeRequest([1, 2, 3], SamplingParams(max_tokens=400)))\n"
        "    while req.events.empty():\n"
        "        time.sleep(0.01)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    while not w._draining:\n"
        "        time.sleep(0.01)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    while (ev := req.events.get())[0] == 'token':\n"
        "        pass\n"
        "    print('request ended:', *ev, flush=True)\n"
        "t = threading.Thread(target=driver, daemon=True)\n"
        "t.start()\n"
        "srv.serve_until_signal()\n"
        "t.join(30)\n"
        "print('stopped', flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "stopped" in out.stdout, out.stderr[-2000:]
    assert "draining 1 request(s) in flight for up to 600 s (Ctrl-C again to force the exit)" in out.stderr
    assert "second signal: forcing the exit now" in out.stderr
    assert "request ended: error the server was forced to exit before this request finished" in out.stdout


def test_dwdp_serve_served_model_names_and_signal(tmp_path):
    """``dwdp serve --served-model-name``: /v1/models lists the names, a request naming
    another model gets 404; SIGINT with nothing running stops at once, saying so."""
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dwdp.cli", "serve", "--port", "0", "--served-model-name",
                             "mine", "mine-too"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "http://" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-2000:]
        url = re.search(r"http://[\d.]+:\d+", line).group(0)

        def up():
            try:
                return _get(url, "/health")[0] == 200
            except urllib.error.URLError:  # the address is printed just before the listener starts
                return False

        _wait_for(up, timeout=60, what="the server to listen")
        assert [m["id"] for m in json.loads(_get(url, "/v1/models")[1])["data"]] == ["mine", "mine-too"]
        code, body = _post(url, {"model": "gpt-4o", "prompt": [1], "max_tokens": 1})
        assert code == 404 and json.loads(body)["error"]["code"] == "model_not_found"
        code, body = _post(url, {"model": "mine-too", "prompt": [1], "max_tokens": 1})
        assert code == 200 and json.loads(body)["model"] == "mine-too"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "dwdp serve: stopped" in out, err[-2000:]
    assert "shutting down: no requests in flight" in err
    assert re.search(r"cmpl-\w+: length, prompt 1 tok, output 1 tok, TTFT [\d.]+ s, total [\d.]+ s", err), err
