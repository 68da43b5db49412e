"""HTTP front end: OpenAI-compatible ``/v1/completions`` (streaming and not), ``/v1/models``,
``/health`` and Prometheus ``/metrics``. Binds to 127.0.0.1 unless told otherwise; an
optional API key is required as ``Authorization: Bearer <key>``."""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..decode import SamplingParams
from .worker import QueueFull, ServeRequest, ServingWorker, WorkerDown

MAX_BODY = 16 << 20


def load_tokenizer(model_dir: str):
    """The checkpoint's Hugging Face tokenizer, or None (then prompts must be token ids)."""
    import os
    import sys

    if not (os.path.isdir(model_dir) and any(os.path.exists(os.path.join(model_dir, f))
                                             for f in ("tokenizer.json", "tokenizer_config.json"))):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # token ids still work
        print(f"warning: could not load the tokenizer in {model_dir} ({e}); prompts must be token ids",
              file=sys.stderr)
        return None


class BadRequest(ValueError):
    pass


def parse_completion(body: bytes, tokenizer, vocab: int) -> tuple[list[int], SamplingParams, bool]:
    try:
        req = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}")
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object")
    prompt = req.get("prompt")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise BadRequest("this model was loaded without a tokenizer: send the prompt as a list of token ids")
        prompt = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        if len(prompt) != 1:
            raise BadRequest("send one prompt per request")
        prompt = prompt[0]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
        raise BadRequest("'prompt' must be a non-empty list of token ids (or a string when a tokenizer is loaded)")
    known = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "stream", "seed", "model", "eos_token_id",
             "n", "user"}
    unknown = sorted(set(req) - known)
    if unknown:
        raise BadRequest(f"unsupported field(s): {', '.join(unknown)}")
    if req.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported")

    def num(name, kind, default):
        v = req.get(name, default)
        if v is None:
            return default
        if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
            raise BadRequest(f"'{name}' must be an integer")
        if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise BadRequest(f"'{name}' must be a number")
        return kind(v)

    params = SamplingParams(max_tokens=num("max_tokens", int, 16), temperature=num("temperature", float, 1.0),
                            top_k=num("top_k", int, 0), top_p=num("top_p", float, 1.0),
                            eos_token_id=num("eos_token_id", int, None), seed=num("seed", int, None))
    try:
        params.validate(vocab)
    except ValueError as e:
        raise BadRequest(str(e))
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    return prompt, params, stream


def make_handler(worker: ServingWorker, model_name: str, tokenizer=None, api_key: str | None = None,
                 request_timeout_s: float = 600.0):
    vocab = worker.model.config.vocab_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "dwdp"

        def log_message(self, fmt, *args):  # quiet; metrics say what happened
            pass

        def _send(self, code: int, obj, headers: dict | None = None, ctype="application/json"):
            data = (json.dumps(obj) if ctype == "application/json" else obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, msg: str, kind: str, headers=None):
            self._send(code, {"error": {"message": msg, "type": kind, "code": code}}, headers)

        def _authorized(self) -> bool:
            if api_key and self.headers.get("Authorization", "") != f"Bearer {api_key}":
                self._error(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error")
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                if worker.failure:
                    return self._error(503, worker.failure, "worker_down")
                return self._send(200, {"status": "ok"})
            if not self._authorized():
                return
            if self.path == "/metrics":
                return self._send(200, worker.metrics.render(), ctype="text/plain; version=0.0.4")
            if self.path == "/v1/models":
                cfg = worker.model.config
                return self._send(200, {"object": "list", "data": [{
                    "id": model_name, "object": "model", "owned_by": "dwdp", "vocab_size": cfg.vocab_size,
                    "max_model_len": cfg.max_position_embeddings, "tokenizer": tokenizer is not None}]})
            self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self):
            if not self._authorized():
                return
            if self.path != "/v1/completions":
                return self._error(404, f"no route {self.path}", "not_found")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._error(413, f"body over {MAX_BODY} bytes", "invalid_request_error")
            try:
                prompt, params, stream = parse_completion(self.rfile.read(length), tokenizer, vocab)
                req = worker.submit(ServeRequest(prompt, params))
            except BadRequest as e:
                return self._error(400, str(e), "invalid_request_error")
            except QueueFull as e:
                return self._error(429, str(e), "rate_limit_error", {"Retry-After": "1"})
            except WorkerDown as e:
                return self._error(503, str(e), "worker_down")
            except ValueError as e:
                return self._error(400, str(e), "invalid_request_error")
            created = int(time.time())
            if stream:
                return self._stream(req, created, len(prompt))
            tokens, reason, deadline = [], None, time.monotonic() + request_timeout_s
            while reason is None:
                try:
                    kind, val = req.events.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    return self._error(504, f"no result within {request_timeout_s:.0f} s", "timeout")
                if kind == "token":
                    tokens.append(val)
                elif kind == "done":
                    reason = val
                else:
                    return self._error(500, val, "worker_error")
            self._send(200, {"id": req.id, "object": "text_completion", "created": created, "model": model_name,
                             "choices": [self._choice(tokens, reason)],
                             "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                                       "total_tokens": len(prompt) + len(tokens)}})

        def _choice(self, tokens, reason):
            text = tokenizer.decode(tokens) if tokenizer is not None else ""
            return {"index": 0, "text": text, "token_ids": tokens, "finish_reason": reason, "logprobs": None}

        def _stream(self, req: ServeRequest, created: int, prompt_len: int):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            n, deadline = 0, time.monotonic() + request_timeout_s

            def event(obj):
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

            try:
                while True:
                    try:
                        kind, val = req.events.get(timeout=max(0.01, deadline - time.monotonic()))
                    except queue.Empty:
                        event({"error": {"message": "timed out", "type": "timeout"}})
                        break
                    if kind == "error":
                        event({"error": {"message": val, "type": "worker_error"}})
                        break
                    tokens, reason = ([val], None) if kind == "token" else ([], val)
                    n += len(tokens)
                    chunk = {"id": req.id, "object": "text_completion", "created": created, "model": model_name,
                             "choices": [self._choice(tokens, reason)]}
                    if reason:
                        chunk["usage"] = {"prompt_tokens": prompt_len, "completion_tokens": n,
                                          "total_tokens": prompt_len + n}
                    event(chunk)
                    if reason:
                        break
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; the request still completes and frees its slot

    return Handler


class Server:
    def __init__(self, worker: ServingWorker, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 tokenizer=None, api_key: str | None = None):
        self.worker = worker
        self.httpd = ThreadingHTTPServer((host, port), make_handler(worker, model_name, tokenizer, api_key))
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.worker.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dwdp-http", daemon=True)
        self._thread.start()

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self.worker.stop(drain_timeout_s)
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve_until_signal(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        self.shutdown()
