"""The HTTP server end to end on CPU: OpenAI-compatible completions against transformers'
generate, streaming, errors with reasons, back-pressure, a crashed worker, shutdown,
metrics, and the load generator."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from dwdp.serve.loadtest import run_loadtest
from dwdp.serve.server import Server, load_tokenizer
from dwdp.serve.worker import ServingWorker
from dwdp.workload import WorkloadSpec


def _server(model, **kw):
    api_key = kw.pop("api_key", None)
    srv = Server(ServingWorker(model, **kw), "tiny", "127.0.0.1", 0, None, api_key)
    srv.start()
    return srv, f"http://127.0.0.1:{srv.port}"


def _post(url, obj, key=None, raw=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/v1/completions", data=raw if raw is not None else json.dumps(obj).encode(),
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


@pytest.fixture(scope="module")
def served(ref_cases):
    ref = ref_cases["qwen3_moe"]
    srv, url = _server(ref.ours(), max_num_tokens=32, max_batch=4)
    yield ref, url
    srv.shutdown(5)


def test_completion_matches_transformers(served):
    ref, url = served
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
        want = ref.hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        assert res["choices"][0]["token_ids"] == want
        assert res["choices"][0]["finish_reason"] == "length"
        assert res["usage"] == {"prompt_tokens": len(p), "completion_tokens": 8, "total_tokens": len(p) + 8}


def test_streaming(served):
    _, url = served
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
        {"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        lines = [ln.strip() for ln in r if ln.strip()]
    assert lines[-1] == b"data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert len(tokens) == 5 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    code, body = _post(url, {"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0})
    assert json.loads(body)["choices"][0]["token_ids"] == tokens


@pytest.mark.parametrize("body,msg", [
    (b"{bad", "malformed JSON"), (b"[1, 2]", "JSON object"),
    (json.dumps({"prompt": "hello"}).encode(), "without a tokenizer"),
    (json.dumps({"prompt": []}).encode(), "non-empty list"),
    (json.dumps({"prompt": [1], "temperature": -1}).encode(), "temperature"),
    (json.dumps({"prompt": [1], "max_tokens": "many"}).encode(), "'max_tokens' must be an integer"),
    (json.dumps({"prompt": [1], "max_tokens": 1000}).encode(), "exceeds the model's context"),
    (json.dumps({"prompt": [10 ** 6]}).encode(), "token ids must lie"),
    (json.dumps({"prompt": [1], "best_of": 2}).encode(), "unsupported field"),
])
def test_bad_requests_get_400_with_reason(served, body, msg):
    _, url = served
    code, text = _post(url, None, raw=body)
    assert code == 400 and msg in json.loads(text)["error"]["message"]


def test_routes_health_metrics(served):
    _, url = served
    assert _get(url, "/nope")[0] == 404
    assert json.loads(_get(url, "/health")[1]) == {"status": "ok"}
    info = json.loads(_get(url, "/v1/models")[1])["data"][0]
    assert info["vocab_size"] == 320 and info["max_model_len"] == 512
    _post(url, {"prompt": [4, 5], "max_tokens": 3})
    text = _get(url, "/metrics")[1]
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert vals["dwdp_requests_total"] >= 1 and vals["dwdp_generation_tokens_total"] >= 3
    assert vals["dwdp_time_to_first_token_seconds_count"] >= 1
    assert vals['dwdp_time_to_first_token_seconds_bucket{le="+Inf"}'] == vals["dwdp_time_to_first_token_seconds_count"]
    assert "dwdp_queue_depth" in vals and "dwdp_inter_token_latency_seconds_sum" in vals


def test_api_key(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours(), api_key="sekret")
    try:
        assert _post(url, {"prompt": [1], "max_tokens": 1})[0] == 401
        assert _post(url, {"prompt": [1], "max_tokens": 1}, key="wrong")[0] == 401
        assert _post(url, {"prompt": [1], "max_tokens": 1}, key="sekret")[0] == 200
        assert _get(url, "/health")[0] == 200  # probes need no key
    finally:
        srv.shutdown(5)


def test_full_queue_gets_429_and_nothing_hangs(ref_cases):
    model = ref_cases["qwen3_moe"].ours()
    srv, url = _server(model, max_queue=1)
    slow = srv.worker.decode._forward

    def slower(batch):
        time.sleep(0.05)
        return slow(batch)

    srv.worker.decode._forward = slower
    try:
        first = threading.Thread(target=_post, args=(url, {"prompt": [1, 2], "max_tokens": 40}))
        first.start()
        time.sleep(0.3)
        code, body = _post(url, {"prompt": [3], "max_tokens": 2})
        assert code == 429 and "limit 1" in body
        first.join(30)
        assert not first.is_alive()
        assert _post(url, {"prompt": [3], "max_tokens": 2})[0] == 200  # capacity is back
    finally:
        srv.shutdown(5)


def test_crashed_worker_fails_requests_loudly(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours())

    def boom(batch):
        raise RuntimeError("simulated device fault")

    srv.worker.decode._forward = boom
    try:
        code, body = _post(url, {"prompt": [1, 2, 3], "max_tokens": 4})
        assert code == 500 and "simulated device fault" in body
        code, body = _get(url, "/health")
        assert code == 503 and "serving loop crashed" in body
        assert _post(url, {"prompt": [1], "max_tokens": 2})[0] == 503
    finally:
        srv.shutdown(2)


def test_graceful_shutdown_finishes_in_flight(ref_cases):
    srv, url = _server(ref_cases["qwen3_moe"].ours())
    out = {}
    th = threading.Thread(target=lambda: out.update(r=_post(url, {"prompt": [1, 2], "max_tokens": 30})))
    th.start()
    time.sleep(0.2)
    srv.worker.stop(drain_timeout_s=30)
    th.join(30)
    assert out["r"][0] == 200 and len(json.loads(out["r"][1])["choices"][0]["token_ids"]) == 30
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_loadtest_against_server(served):
    _, url = served
    s = run_loadtest(url, WorkloadSpec(num_requests=6, isl=20, dist="uniform", ratio=0.5, rate=50.0), 4,
                     log=lambda m: None)
    assert s["succeeded"] == 6 and s["failed"] == 0 and s["output_tokens"] == 24
    assert s["tps_per_gpu"] > 0 and s["tps_per_user"] > 0 and s["ttft_s"]["p50"] > 0
    with pytest.raises(ValueError, match="only targets a server on this machine"):
        run_loadtest("http://10.0.0.1:8000", WorkloadSpec(num_requests=1), 1)


def test_text_prompts_with_a_tokenizer(ref_cases, tmp_path):
    """A checkpoint with a Hugging Face tokenizer accepts text and returns text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(320)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path.parent / "missing")) is None
    hf_tok = load_tokenizer(str(tmp_path))  # what `dwdp serve --model <checkpoint dir>` does
    srv = Server(ServingWorker(ref_cases["qwen3_moe"].ours()), "tiny", "127.0.0.1", 0, hf_tok, None)
    srv.start()
    url = f"http://127.0.0.1:{srv.port}"
    try:
        code, body = _post(url, {"prompt": "t5 t9 t2 t7", "max_tokens": 4, "temperature": 0})
        assert code == 200, body
        by_text = json.loads(body)["choices"][0]
        by_ids = json.loads(_post(url, {"prompt": [5, 9, 2, 7], "max_tokens": 4, "temperature": 0})[1])["choices"][0]
        assert by_text["token_ids"] == by_ids["token_ids"]
        assert by_text["text"].split() == [f"t{i}" for i in by_text["token_ids"]]
    finally:
        srv.shutdown(5)
